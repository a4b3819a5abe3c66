"""The ensemble's model families: one module each, behind one protocol (base.py) and one registry."""
