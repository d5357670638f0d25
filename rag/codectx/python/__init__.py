"""Python front end of code context: tolerant parsing, expected types, scopes, the workspace index."""
