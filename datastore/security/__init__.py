"""Who is asking, and what they may do: identities, certificates and TLS.

``identity`` (who a request is from), ``tls`` (the server's TLS context,
certificate identities, revocation), ``certs`` (a small CA for the
``datastore certs`` command).
"""
