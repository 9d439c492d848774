"""The in-VM agent (light: no nftables, libvirt or pyudev imports)."""
