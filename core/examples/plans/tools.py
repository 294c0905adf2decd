"""
Plain Python tools for the news-summary plan: keyword retrieval, cleanup and an
extractive summary. Each runs in a hardened, single-use container like any tool;
only its source (without the decorator) is sent there, so each keeps what it
needs, the small article collection included, inside its own body.

The model tools (``embed_search``, ``summarize``) can take the place of
``search_articles`` and ``summarize_extractive`` with the same result shapes.
"""

from callward.core import JSONValue, tool

_TEXTS: JSONValue = {"type": "array", "minItems": 1, "maxItems": 16,
                     "items": {"type": "string", "maxLength": 20000}}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 256},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
)
def search_articles(query: str, limit: int = 3) -> dict[str, object]:
    """Find news articles by keywords: {hits: [{id, title, text, score}]}, best first."""
    import re

    articles = [
        ("a1", "Grid-scale battery storage doubles in a year",
         "<p>Utilities added record battery storage to the grid this year.</p> Operators say "
         "storage now shifts solar power into the evening peak. Advertisement Prices for "
         "lithium cells fell again, and grid operators expect more projects."),
        ("a2", "Regulator approves new rules for grid batteries",
         "The energy regulator approved rules that let batteries sell several services to the "
         "grid at once. Read more: Storage owners welcomed the decision, which takes effect "
         "in spring."),
        ("a3", "Solar farm opens on former coal site",
         "A 300 MW solar farm opened on land that held a coal plant until 2019. <b>The farm "
         "</b> pairs panels with a battery so output can follow demand. Advertisement Local "
         "officials expect two hundred permanent jobs."),
        ("a4", "Heat pumps outsell gas boilers",
         "For the first time, heat pumps outsold gas boilers in the quarter. Installers report "
         "waiting lists of several months."),
        ("a5", "Storage startup raises funds for iron-air batteries",
         "A startup building iron-air batteries for multi-day grid storage raised new funds. "
         "Its first plant will supply a utility in the north. Read more:"),
        ("a6", "Community solar reaches rural towns",
         "Community solar projects now serve forty rural towns. Residents subscribe to a share "
         "of a local solar farm and receive credits on their bills."),
        ("a7", "Football club installs stadium roof panels",
         "The club covered its stadium roof with solar panels, which will supply a third of "
         "its power on match days."),
    ]
    words = set(re.findall(r"[a-z0-9]+", query.lower()))
    scored = []
    for article_id, title, text in articles:
        tokens = re.findall(r"[a-z0-9]+", f"{title} {text}".lower())
        score = sum(1 for token in tokens if token in words)
        if score:
            scored.append((-score, article_id, title, text))
    scored.sort()
    return {"hits": [{"id": article_id, "title": title, "text": text, "score": -score}
                     for score, article_id, title, text in scored[:limit]]}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"texts": _TEXTS},
        "required": ["texts"],
        "additionalProperties": False,
    },
)
def clean_text(texts: list[str]) -> dict[str, object]:
    """
    Strip markup, boilerplate ("Advertisement", "Read more:") and extra spaces:
    {texts: each cleaned, text: all of them joined, for a tool that takes one text}.
    """
    import re

    cleaned = []
    for text in texts:
        plain = re.sub(r"<[^>]{0,200}>", " ", text)
        plain = re.sub(r"\b(Advertisement|Read more:)", " ", plain)
        cleaned.append(re.sub(r"\s+", " ", plain).strip())
    return {"texts": cleaned, "text": " ".join(cleaned)}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "texts": _TEXTS,
            "sentences": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["texts"],
        "additionalProperties": False,
    },
)
def summarize_extractive(texts: list[str], sentences: int = 1) -> dict[str, object]:
    """The first ``sentences`` sentences of each text, joined: {summary, sentences}."""
    import re

    picked = []
    for text in texts:
        parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()]
        picked.extend(parts[:sentences])
    return {"summary": " ".join(picked), "sentences": picked}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"topic": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": ["topic"],
        "additionalProperties": False,
    },
)
def internal_wire(topic: str) -> dict[str, object]:
    """Embargoed items from the internal wire (the policy labels every result secret)."""
    return {"items": [{"topic": topic, "text": f"Embargoed until Friday: {topic} merger agreed."}]}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "channel": {"type": "string", "pattern": "^[a-z-]{1,32}$"},
            "text": {"type": "string", "maxLength": 20000},
        },
        "required": ["channel", "text"],
        "additionalProperties": False,
    },
    labels=("egress",),
)
def publish(channel: str, text: str) -> dict[str, object]:
    """Publish text to a channel (it only says it would: the example has no outlet)."""
    return {"channel": channel, "published_chars": len(text)}
