"""Plan builders, one module per part of the install. Each is a pure function
`steps(cfg) -> list[Step]`; `installer.plan` puts them in order."""
