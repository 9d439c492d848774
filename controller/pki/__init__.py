"""dom0's certificate authority: a root, issuing intermediates rotated with
overlap, the controller's server certificate and the agents' short-lived
client certificates (docs/ca.md).

    issue.py     what is issued and what is accepted back: pure
    store.py     certificates, serials, revocations in the state store
    report.py    status rows and expiry warnings: pure
    ca.py        the shell: key files under STATE/ca/, init, rotate, issue
    commands.py  `dom0 ca init|status|list|revoke|rotate`
"""
