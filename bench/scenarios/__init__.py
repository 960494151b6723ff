"""One module per scenario; each has ``async def run(opts: Options) -> Result``."""
