"""Transfer jobs: a persistent queue of copies between this store, other datastores, HTTP(S) servers and
rclone remotes (``states.py`` the vocabulary, ``runner.py`` the worker, ``drivers/`` the ends)."""
