"""The lifecycle of transfers and their files, without HTTP: the states and their transition table
(``states.py``), the one place that makes transitions (``machine.py``), and the events they announce
(``events.py``)."""
