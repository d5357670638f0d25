"""Ray actors hosting model shards; the ring's process group; fault handling. The only package
(with the CLI) that imports Ray: the engine logic stays a plain class, Ray is the transport."""
