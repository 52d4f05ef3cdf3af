"""strongSwan adapter: VICI command and event sessions."""
