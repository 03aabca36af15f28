"""What crosses between peers: the records of every RPC (messages), their compact layout (compact), frames on a
byte stream (framing), error codes (codes) and the bounds a server applies (limits). No client, server or app
code: both sides build on this."""
