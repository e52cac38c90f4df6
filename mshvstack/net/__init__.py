"""Network backends: where a synthetic NIC's frames go on the host (user-mode NAT or a TAP)."""
