"""The HTTP side: the aiohttp application, its routes (legacy and JSON uploads, tus, downloads,
the control plane, events), connection admission, request bodies and ``--workers`` processes.

Everything here translates requests into calls of the lifecycle and answers; no state change of a
transfer is decided here.
"""
