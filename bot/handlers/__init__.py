"""Update handlers grouped by concern: search, rating, privacy, admin, help, errors."""
