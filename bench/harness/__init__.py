"""What the tests and the studies share to start, load and read servers: servery, the bare uvicorn
server and MLServer, wrk, request bodies, where results go. Imports bench's product, no study."""
