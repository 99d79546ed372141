"""Echo untrusted input values in logs and diagnostics without letting them flood either."""

EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """repr(value), cut to `limit` characters with its full length said when longer:
    "'aaaa...' (200000 characters)". Lists and other objects are cut on their repr."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if hasattr(value, '__len__') else len(text)
    unit = 'characters' if isinstance(value, (str, bytes)) else 'items'
    return f'{text[:limit]}... ({size} {unit})'
