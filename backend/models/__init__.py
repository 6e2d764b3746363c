"""Models: frozen foundation backbones, generic PEFT pieces (the methods live in backend/methods/)."""
