"""FocusedFashion's Telegram bot: photo in, five similar products out, ratings logged.

``python -m bot`` (or ``focusedfashion-bot``) runs it; :func:`bot.app.build_application`
builds the python-telegram-bot Application used by both the command and the tests.
"""
