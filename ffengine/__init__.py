"""FocusedFashion engine: photo -> MobileNetV2 features -> nearest store products.

No Telegram in here: the bot (``bot/``) and the trainer (``train/``) both build on this package.
"""

__version__ = "0.1.0"
