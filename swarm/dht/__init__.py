"""What servers and relays announce in the hivemind DHT (records), and the validator that lets only a server
write its own record (validator)."""
