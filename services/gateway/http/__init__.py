"""The gateway's OpenAI-compatible HTTP front end (aiohttp, on the gateway's event loop and pipeline)."""
