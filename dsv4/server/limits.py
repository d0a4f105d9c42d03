"""The default request limits of ``dsv4 serve`` (``--max-body-bytes``, ``--max-json-depth``), in a module
of their own so that the command line reads them without importing the web stack."""

# 32 MiB: a 1M-token conversation is 4-8 MB of JSON (CJK text escaped as \uXXXX is 6 bytes a character),
# with room for tool schemas and results; beyond that a body is refused with 413 before it is read.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# Arrays and objects inside each other, the body itself being level 1: real requests (tool schemas
# included) stay well under 20; Python's JSON parser and encoder recurse, so thousands of levels would be
# a RecursionError.
DEFAULT_MAX_JSON_DEPTH = 64
