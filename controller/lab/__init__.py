"""The lab: a whole dom0 host in network namespaces, for the demo and lab tests.

Modules, in the order a lab comes to life (all standard library, synchronous,
importable without trio or pyroute2; call them from trio through
`trio.to_thread.run_sync`):

    rundir          Lab handle, run directory /run/dom0-lab/NAME, the record lab.json
    netns           ip netns: create, delete, run inside, PIDs inside
    processes       start detached, PID + start time, stop by PID (TERM, then KILL)
    topology        addresses, names and `ip -batch` wiring of wan, vpn, dom0, vmI
    services        the echo services, started and waited for
    controllerproc  `dom0 run` in NAME-dom0: start, stop, kill, restart, status
    dhcpclient      busybox udhcpc per VM, its event script, leases
    build           create() a lab; add_vm() / remove_vm() later
    vm              acting as a VM: run, addresses, MAC, probes
    teardown        down(): idempotent, crash-tolerant
    echo, probe     the services' and probes' own command lines
    forge           crafted frames from a VM (scapy-built), marker sniffers, held TCP flows
    demo, commands  `dom0 lab demo`, `dom0 lab up|down|demo`

Nothing here changes the root network namespace.
"""
