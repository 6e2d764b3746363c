"""The papers' methods, one package each, built on the shared backbones and PEFT pieces."""
