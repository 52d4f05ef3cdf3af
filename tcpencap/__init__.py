"""tcpencap: IKE and IPsec over TCP (RFC 9329, Cisco cTCP) beneath strongSwan."""

__version__ = "0.1.0"
