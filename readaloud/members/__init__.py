"""The ensemble's model families: one folder each (gbm/, decoder/, pair/, encdec/), behind one
protocol (base.py) and one registry (registry.py)."""
