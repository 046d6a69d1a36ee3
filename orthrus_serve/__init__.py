"""orthrus-serve: the serving layer (gRPC + OpenAI HTTP on Ray Serve) over orthrus-engines."""
