"""Deployment: a Triton model repository from a build folder (repository), a real Triton server on it
(server), and Triton's config.pbtxt written and checked with Triton's own protobuf (triton_config)."""
