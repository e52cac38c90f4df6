"""CPU engines that execute guest code for the simulated hypervisor."""
