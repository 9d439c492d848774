"""dom0: the network controller of a Linux virtualization host."""
