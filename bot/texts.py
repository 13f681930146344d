"""Everything the bot says to people, in one place (short, friendly, no jargon)."""

from __future__ import annotations

HELP = (
    "👗 Send me a photo of a piece of clothing (or shoes, a bag...) and I'll show you "
    "the five most similar products from the store.\n\n"
    "• Send it as a photo, or as an image file (JPEG, PNG, WebP).\n"
    "• A whole outfit in one photo? Under the results, tap the item you mean.\n"
    "• Rate the matches with 👍 / 👎: it teaches me your taste.\n\n"
    "/privacy – what I keep about you · /forget – erase it"
)
HINT = "Send me a photo of clothing and I'll find similar products. /help explains more."
STICKER = "Nice sticker! 😄 I can only search with real photos, though: send me a picture of clothing."
NOT_IMAGE_FILE = "That file isn't an image I can search with. Please send a photo (JPEG or PNG) of clothing."
TOO_LARGE = "That picture is too large for me to download ({limit} MiB max). Please send a smaller photo or a screenshot."
BAD_IMAGE = "Sorry, I couldn't use that picture: {reason}"
DOWNLOAD_FAILED = "I couldn't download that picture from Telegram. Please try sending it again."
ALBUM = "You sent several photos at once: I searched the first one. Send the others one at a time to search them too."
ONE_AT_A_TIME = "⏳ One photo at a time, please: I'm still working on your previous one."
BUSY = "😅 I'm very busy right now. Please try again in a minute."
SLOW_DOWN = "🐢 That's a lot of photos at once. Please send the next one in {seconds} s."
NO_RESULTS = "I couldn't find anything similar in the catalogue, sorry."
RESULTS = "Here are the closest matches. Rate each with 👍 or 👎 (it helps me learn); 🔗 opens the product page, 🔁 finds more like it."
LOOKING_FOR = "Something else in your photo? Looking for: {items} (tap it below)"
ITEM_RESULTS = "{item} from your photo:"
MORE_RESULTS = "🔁 More like “{title}”:"
SEARCHING = "🔎 On it…"
APOLOGY = "Sorry, something went wrong on my side. Please try again in a minute."

RATED = {1: "👍 Thanks, noted!", -1: "👎 Thanks, noted!"}
NOT_SAVED = "⚠️ I couldn't save that just now. Please tap it again in a minute."
STORAGE_DOWN = "⚠️ I can't save anything just now, so I couldn't finish that. Please try again in a minute."
NOT_YOURS = "These buttons belong to someone else's search."
EXPIRED = "This button has expired. Send a new photo to search again."

PRIVACY = (
    "🔒 What I keep:\n"
    "• your Telegram user id and language;\n"
    "• for each search: the time, Telegram's references to the photo, 1280 numbers describing it "
    "(not the photo itself), the items I saw in it, which button you pressed, and the products I showed;\n"
    "• your 👍 / 👎 ratings.\n"
    "They are used to improve the recommendations. Your photos are never stored.\n\n"
    "Right now I keep {searches} search(es) and {ratings} rating(s) of yours.\n"
    "/forget erases all of it (for a day after, I only note that you asked, so that a search still running "
    "elsewhere is not kept either)."
)
FORGET_WAIT = "Your last search is still running; send /forget again in a moment."
FORGOTTEN = "🧹 Done: I erased your {searches} search(es) and {ratings} rating(s). You're a stranger to me now."
NOTHING_TO_FORGET = "I don't keep anything about you. 🙂"

USER_COMMANDS = {
    "start": "What this bot does",
    "help": "How to search",
    "privacy": "What is kept about you",
    "forget": "Erase your searches and ratings",
}
ADMIN_COMMANDS = {
    "stats": "Usage and quality numbers",
    "models": "List model versions",
    "retrain": "Retrain from feedback",
    "rollback": "Switch to a model version: /rollback NAME",
    "reload": "Re-read the active index from disk",
}
