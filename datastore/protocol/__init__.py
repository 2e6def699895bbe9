"""Pure protocol code: manifests, names, timestamps. No aiohttp, no disk, no state."""
