"""The ends of a copy: one interface (``interface.py``) and a driver per kind of end."""
