"""Netfilter adapter: own iptables chains, NFQUEUE reader, raw-socket injection."""
