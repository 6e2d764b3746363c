"""Beyond one machine (optional; never imported by single-machine jobs): `torchrun` launches a fine-tune on
several processes (`torchrun.py`)."""
