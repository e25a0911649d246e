"""Prompt categories: a fast keyword and pattern classifier for OpenAI request bodies. Pure.

`PromptClassifier(categories).classify_payload(body)` names the task a request asks for
(`code`, `sql`, `math`, `translation`, `summarization`, `questions` or `other`), so that
energy can be reported per kind of work. It uses no model and no I/O, only `re` and dicts.
The labelling rules it aims at are in tests/data/README.md.

How it scores. Each category sums the weights of the cues found:

- words and phrases of up to four words, in several languages ("translate", "traduis",
  "übersetze", "in French", "auf Deutsch", "summarize", "tl;dr", "zusammenfassen",
  "group by", "derivative", "stack trace"), matched as dict lookups on lower-cased tokens,
  plus prefix stems ("summar*"). CJK cues are matched as substrings instead;
- structural patterns: fenced code, `def f(`, `{`/`;`, camelCase, `...Error`, `O(n)`,
  `SELECT`, `orders(id, customer_id, ...)`, `3x + 7`, `x^2`, LaTeX, the numbers of a word
  problem, `English: ... French:`, question marks.

Each cue counts once and each pattern up to a cap. What the text is *about* then saturates:
above `SATURATION_KNEE` only `SATURATION_SLOPE` of the score counts. This way a pasted
changelog that names ten tools cannot outvote the one word that says "summarize". The cues
that say what to *do* are added after saturation:

- the instruction line before or after a paste (its word cues count `INSTRUCTION_WEIGHT`
  times more);
- greetings and thanks, only in a text of at most `CHAT_MAX_CHARS`;
- an interrogative first word ("why", "pourquoi", "wie", ...) for `questions`;
- `LONG_TEXT_BONUS` for `summarization` when the text is long.

The best score wins if it reaches `MIN_SCORE`, otherwise the result is `other`.

Ties. Equal scores go to the category that comes first in `PRIORITY`, so the more specific
task wins: translation, summarization, sql, code, math, questions, other. A winner that is
not in the configured set becomes `other`. It does not fall back to the runner-up: a SQL
prompt is not a code prompt just because "sql" is not configured.

What is read, and so the cost bound:
- chat: the system/developer messages among the first `MAX_MESSAGES_SCANNED` messages, and
  the last user message among the last `MAX_MESSAGES_SCANNED`;
- completions: `prompt`; embeddings: `input`;
- at most `MAX_PARTS` text parts or strings of each.

Each part is cut to its first `PART_HEAD_CHARS` and last `PART_TAIL_CHARS` characters. The
joined user text is cut to its first `USER_HEAD_CHARS` and last `USER_TAIL_CHARS`, and the
system text to its first `SYSTEM_MAX_CHARS`. The tail is kept because the instruction often
comes after a long paste ("... Summarize the above."). When the user text is longer than
`FOCUS_MIN_CHARS`, only its first `FOCUS_HEAD_CHARS` and last `FOCUS_TAIL_CHARS` get the
patterns and full word weight. The middle is most likely pasted material: only its words
are scanned, at `BODY_WEIGHT`. A 1 MB prompt therefore costs about as much as a 10 KB one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_CATEGORIES: tuple[str, ...] = (
    "code",
    "sql",
    "math",
    "translation",
    "summarization",
    "questions",
    "other",
)
FALLBACK: Final = "other"
# Equal scores go to the earlier category: specific tasks before generic ones.
PRIORITY: Final = ("translation", "summarization", "sql", "code", "math", "questions", "other")

PART_HEAD_CHARS: Final = 4096
PART_TAIL_CHARS: Final = 1024
USER_HEAD_CHARS: Final = 6144
USER_TAIL_CHARS: Final = 2048
SYSTEM_MAX_CHARS: Final = 2048
MAX_PARTS: Final = 8  # text parts per message, strings per prompt list, system parts
MAX_MESSAGES_SCANNED: Final = 64
FOCUS_MIN_CHARS: Final = 700
FOCUS_HEAD_CHARS: Final = 300
FOCUS_TAIL_CHARS: Final = 300
BODY_WEIGHT: Final = 0.25
CHAT_MAX_CHARS: Final = 80  # greetings and thanks count only in texts this short
CHAT_MAX_SCORE: Final = 3.0
INSTRUCTION_MIN_CHARS: Final = 200  # a longer multi-line text: its first/last lines again
INSTRUCTION_MAX_CHARS: Final = 200
INSTRUCTION_WEIGHT: Final = 2.5
LONG_TEXT_CHARS: Final = 600
LONG_TEXT_BONUS: Final = 1.5  # summarization: a long text with a short instruction
MIN_SCORE: Final = 1.2
# Diminishing returns: above SATURATION_KNEE only SATURATION_SLOPE of a score counts, so a
# pile of topic words (a pasted changelog names many tools) cannot outvote the one word
# that names the task ("summarize").
SATURATION_KNEE: Final = 4.0
SATURATION_SLOPE: Final = 0.3

_SYSTEM_ROLES: Final = frozenset({"system", "developer"})

# --- cue tables ---------------------------------------------------------------------------
# category -> ((weight, "cue|cue|..."), ...). A cue is a word, a phrase of up to four words
# (matched on tokens, so "tl;dr" is "tl dr" and "many-to-many" is "many to many"), or a
# prefix stem ending in "*". A negative weight takes back a cue that a longer phrase shows
# to be something else ("news story" is not creative writing). CJK cues go in _CJK_CUES
# instead, since CJK text has no spaces to split tokens on.


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_LANGS: Final = _words(
    "english french german spanish italian portuguese dutch japanese chinese korean arabic "
    "russian latin polish turkish greek swedish hindi"
)

_TRANSLATION_PHRASES: Final = "|".join(
    [f"{a} to {b}" for a in _LANGS for b in _LANGS if a != b]
    + [f"{lang} please" for lang in _LANGS]
    + [f"the {lang} for" for lang in _LANGS]
    + [f"{lang} word for" for lang in _LANGS]
    + [f"{a} into {b}" for a in _LANGS for b in _LANGS if a != b]
    + [f"into {lang}" for lang in _LANGS]
    + [f"in {lang}" for lang in _LANGS]
    + [f"to {lang}" for lang in _LANGS]
    + [f"from {lang}" for lang in _LANGS]
)

_CUES: Final[Mapping[str, tuple[tuple[float, str], ...]]] = {
    "translation": (
        (
            4.0,
            "translat*|tradu*|übersetz*|ubersetz*|vertaal*|przetłumacz*|tłumacz*|перевед*|"
            "перевод*|localiz*|localis*|lokalisier*",
        ),
        (
            3.0,
            "how do you say|how would i say|how to say|how do i say|comment dit on|"
            "wie sagt man|cómo se dice|como se dice|como se diz|come si dice|hoe zeg je|"
            "word for|english version|çevir|türkçeye|ingilizceye|ins englische|ins deutsche|"
            "ins französische|ins spanische|ins italienische|al inglés|al francés|al alemán|"
            "al español|al italiano|al portugués|para o português|para o inglês|"
            "para o espanhol|naar het engels|naar het duits|naar het frans|naar het spaans|"
            "naar het nederlands|на английский|на немецкий|на французский|на русский|"
            "na angielski",
        ),
        (
            2.5,
            "en anglais|en français|en allemand|en espagnol|en italien|en portugais|"
            "en néerlandais|en japonais|en chinois|auf englisch|auf deutsch|auf französisch|"
            "auf spanisch|auf italienisch|en inglés|en francés|en alemán|en español|"
            "en italiano|en portugués|in italiano|in inglese|in francese|in tedesco|"
            "in spagnolo|em inglês|em português|in het engels|in het duits|mean in|means in|"
            "significa|bedeutet",
        ),
        (2.0, _TRANSLATION_PHRASES),
        (0.5, " ".join(_LANGS).replace(" ", "|")),
    ),
    "summarization": (
        (
            4.0,
            "summar*|tl dr|tldr|zusammenfass*|riassun*|riassum*|samenvat*|перескаж*|synops*|"
            "sinops*|"
            "streszcz*|résum*",
        ),
        (
            3.0,
            "resum*|key points|main points|key takeaways|takeaways|gist|nutshell|sum up|"
            "boil this down|boil it down|condens*|recap|an abstract|executive summary|"
            "action items|main arguments|key findings|points principaux|punti principali|"
            "puntos principales|hauptpunkte|short version|shorter version|long story short|"
            "précis|what is it about|main ideas|main idea|in a few words|in brief",
        ),
        (2.5, "fasse|fass|vat|highlights|overview|кратко|резюм*"),
        (1.5, "bullet points|shorter|brief|breve|kurz|the above|lo anterior|tweet length"),
        (1.0, "one sentence|sentences|what does it say|what did they decide|decide"),
    ),
    "sql": (
        (
            3.0,
            "sql|mysql|postgres|postgresql|psql|sqlite|mariadb|tsql|plsql|bigquery|redshift|"
            "clickhouse|cte|upsert|subquery|stored procedure|materialized view|"
            "vista materializada|query plan|isolation level|phantom reads|primary key|"
            "foreign key|group by|left join|inner join|right join|outer join|where clause|"
            "union all|jsonb|3nf|database schema|abfrage|requête|requete|запрос|"
            "many to many|seq scan|index scan|explain analyze|composite index|"
            "index composite|create index|create an index|clustered|relational|clé primaire|"
            "clé étrangère|clave primaria|clave foránea|primärschlüssel|fremdschlüssel|"
            "chiave primaria|junction table|join table|table de liaison|jointure|truncate|"
            "sql server|mssql|oracle database|pgadmin|dbeaver|erd|entity relationship",
        ),
        (
            2.0,
            "query|queries|database|databases|datenbank|base de données|base de datos|"
            "banco de dados|vacuum|snowflake|join|joins|order by|window function|consulta|"
            "indexes|rollback|in sql|count rows|number of rows|rows per|trigger|triggers|"
            "a query|this query|the query|my query|sql query|"
            "índice|índices|indices|normalization|denormalize|replication|sharding",
        ),
        (
            1.5,
            "tables|column|columns|schema|acid|spalte|columna|colonne|tabelle|tabellen|tabla|"
            "tablas|tabella|tabel",
        ),
        (
            1.0,
            "table|rows|index|aggregate|transactions|transaction|deadlock|db|union|select|"
            "partitioned|normalize|records|rank|ranks|distinct",
        ),
        (0.5, "having|row|zeilen|filas|rijen|righe|insert|duplicate|customers|unique"),
    ),
    "code": (
        (
            3.0,
            "python|javascript|typescript|java|kotlin|golang|haskell|scala|php|perl|csharp|"
            "bash|powershell|zsh|nodejs|numpy|docker|dockerfile|kubernetes|k8s|terraform|git|"
            "npm|pytest|jest|junit|maven|gradle|webpack|makefile|regex|regexp|"
            "regular expression|flexbox|valgrind|segfault|segmentation fault|stack trace|"
            "traceback|refactor*|linked list|binary search|time complexity|unit test|"
            "unit tests|asyncio|multiprocessing|dependency injection|abstract class|"
            "type hints|borrow checker|event loop|memory leak|argparse|rebase|pull request|"
            "react|django|fastapi|rust|quicksort|mergesort|big o|design pattern|recurs*|"
            "middleware|mutex|semaphore|race condition|cron|crontab|graphql|websocket|"
            "oauth|jwt|kafka|redis|mongodb|sqlalchemy|orm|hashmap|hashtable|"
            "garbage collector|thread safe|concurrency|microservice|microservices|"
            "virtualenv|venv|conda|flutter|dart|xcode|vscode|eslint|prettier|"
            "linter|matlab|lua|elixir|erlang|clojure|fortran|cobol|webassembly|"
            "grep|awk|chmod|curl|nginx|ansible|helm|serverless|rustc|gcc|"
            "clang|cmake|cargo|rails|laravel|spring boot|jquery|nextjs|svelte|"
            "tsconfig|package json|requirements txt|stack overflow|"
            "stackoverflow|null pointer|nullpointerexception|undefined|nan|"
            "bitwise|binary tree|hash map|hash table|data structure|data structures",
        ),
        (
            2.5,
            "html|css|debug*|pointer|async|await|callback|decorator|dekorator|snippet|"
            "data class|cors|swift|ruby|vue|angular|div",
        ),
        (
            2.0,
            "code|coding|implement|implementiere|implementa|function|functions|fonction|"
            "android|ios app|apis|rest api|endpoints|sdk|repo|repository|assembly|"
            "funktion|función|funzione|functie|função|функци*|loop|schleife|bucle|array|"
            "pointer|recursion|algorithm|compiler|compile|frontend|backend|cli|"
            "command line|ide|pandas|flask|node|yaml|dict|closure|lambda|struct|"
            "programm*|eccezioni|excepción|exception|exceptions|classes|char|tuple|tuples|ssh|"
            "vim|linux command|bash command|terminal command|web app|webapp|fullstack|"
            "full stack|docker compose",
        ),
        (
            1.5,
            "method|variable|variables|string|script|skript|shell|api|endpoint|thread|"
            "threads|component|json|csv|module|bug|interface|github|pip|runtime|enum|"
            "promise|promesa|itera*|console|commit|branch|deploy|program|spring|"
            "docstring|syntax",
        ),
        (
            1.0,
            "class|integer|boolean|http|server|import|package|crash|terminal|merge|test|"
            "print|printf|println|echo|return|console log|stack|queue|heap|float|byte|bytes|"
            "liste|listes|express|mock|lint|pipeline|ci|container|containers",
        ),
        (0.7, "tests|library|libraries|browser|librerías|rename"),
        (0.5, "error|file|files|datei|fichier|archivo"),
    ),
    "math": (
        (
            3.0,
            "equat*|équat*|ecuac*|gleichung*|equaz*|vergelijking|уравнен*|integral|"
            "intégrale|integrale|derivative|dérivée|ableitung|derivada|derivata|"
            "differentiable|probability|probabilité|probabilidad|probabilità|"
            "wahrscheinlichkeit|expected value|standard deviation|eigenvalue|eigenvalues|"
            "eigenvector|determinant|polynomial|factorize|factorise|theorem|irrational|"
            "gcd|lcm|factorial|permutation|permutations|taylor series|logarithm|calculus|"
            "how many ways|résous|resuelv*|risolvi|quanto fa|divided by|compounded|"
            "converg*|perimeter|maxima|minima|bayes",
        ),
        (
            2.5,
            "solve|variance|induction|square root|algebra|lös|löse|реши*|simplify|"
            "hoeveel is|cuánto es",
        ),
        (
            2.0,
            "calcul*|berechn*|median|prime|primes|proof|prove|matrix*|formula|fraction|"
            "geometry|arithmetic|radius|multiplied|dice|würfel|statistics|limit|"
            "average speed|velocidad media|vitesse moyenne|durchschnittsgeschwindigkeit|integrate|"
            "polygon|hexagon|pentagon|octagon|decagon|heptagon|diagonal*|anagram*|"
            "combinatorics|hypotenuse|pythagoras|pythagorean|sine|cosine|radian*|slope|"
            "intercept|exponential|divisible|remainder|modulo|countable|uncountable|"
            "compound interest|percentage|pourcentage|porcentaje|percentuale|ratio|"
            "proportion|fractions|decimal|round to|raíz cuadrada|racine carrée|"
            "quadratwurzel|wurzel|flächeninhalt|fläche|umfang|dreieck|kreis|périmètre|"
            "perímetro|triángulo|círculo|moyenne|media aritmética|mittelwert|durchschnitt|"
            "rechne|calcola|hoeveel",
        ),
        (
            1.5,
            "area|aire|triangle|angle*|cone|vector|vectors|infinity|diameter|percent|procent|"
            "prozent|minus|coin|tosses|dado|odds|lotto|homework|mathemat*|sqrt",
        ),
        (
            1.0,
            "how many|compute|average|factor|rational|series|log|circle|cercle|rayon|volume|"
            "combination|combinations|plus|menos|cuánto|combien|km h|chance|sum|equal|"
            "evaluate",
        ),
        (
            0.5,
            "how much|mean|function|speed|interest|graph|maximum|minimum|difference|number|numbers",
        ),
    ),
    "questions": (
        (2.0, "tell me about"),
        (1.5, "explain|explique|erkläre|erklär|explica|spiega|leg uit|объясни"),
        (1.0, "history of|is it true|is it safe"),
    ),
    "other": (
        (
            4.0,
            "poem|poems|poème|poema|poesia|gedicht|стихотворение|haiku|limerick|story|stories|"
            "cuento|storia|joke|jokes|witz|chiste|blague|barzelletta|lyrics|song|chanson|"
            "canción|canzone|slogan|cover letter|resignation letter|once upon a time|"
            "roleplay|role play",
        ),
        (
            3.0,
            "proofread|rephrase|reformul*|backstory|stay in character|brainstorm|itinerary|"
            "name ideas|shopping list|workout plan|out of office|bored",
        ),
        (
            2.5,
            "pretend|act as|rewrite|rap|toast|speech|tweet|dialogue|grammar|"
            "friendlier|höflicher|formuliere|bedtime|"
            "fairy tale|entertain|motivational|quiz|multiple choice|linkedin",
        ),
        (
            2.0,
            "email|e mail|letter|lettre|carta|message|mensaje|mensagem|messaggio|note|"
            "dear|rhyme|ideas|description|recipe|"
            "slogan|funny|verse|birthday|anniversaire|geburtstag|cumpleaños|aniversário|"
            "compleanno|wedding|review|vivid|polite|politely|write an email",
        ),
        (
            1.0,
            "write|écris|écrire|rédige|schreib|schreibe|escribe|escreva|scrivi|schrijf|"
            "напиши|compose|suggest|title|plan|card|karte|character|game|scene|describe|"
            "professional|tone|fun|sound|sort|come up with|erzähl|cuéntame|"
            "raconte|help me write|tell me a",
        ),
        (0.5, "list|create|generate|names|make"),
        # "story" that is not creative writing: a text to work on, or an agile term
        (-4.0, "news story|news stories|this story|user story|user stories|story points"),
    ),
}

# Chit-chat: counted only in short texts, so that the "Hi" and "Thanks" of a pasted email
# do not make a summary request chit-chat.
_CHAT_CUES: Final[Mapping[str, tuple[tuple[float, str], ...]]] = {
    "other": (
        (
            3.0,
            "hi|hello|hey|hola|hallo|ciao|bonjour|salut|servus|moin|olá|hoi|привет|thanks|"
            "thank you|thx|merci|danke|gracias|grazie|obrigado|bedankt|спасибо|good morning|"
            "good night|good evening|guten morgen|buenos días|buongiorno|how are you|"
            "what's up|what s up|come stai|ça va|wie geht|cómo estás|cool|ok|okay|"
            "lol|bye",
        ),
    ),
}

# Interrogative first words: a question, unless other cues say what it is about.
_WH_FIRST: Final = frozenset(
    _words(
        "q what why how who whom por whose when where which qui quoi pourquoi comment quel quelle "
        "quels quelles quand où combien warum wieso weshalb wie wer was wann wo welche "
        "welcher welches woher wozu qué que porqué cómo como quién quien cuál cual cuándo "
        "dónde cuánto cuántos perché come chi cosa quale quali quando dove quanto quem qual "
        "onde quantos quantas wat waarom hoe welke wanneer waar почему как кто что когда где "
        "какой зачем"
    )
)
_YESNO_FIRST: Final = frozenset(
    _words(
        "is are was were do does did can could should would will has have est ist sind kann "
        "gibt es são é"
    )
)
WH_FIRST_WEIGHT: Final = 1.3
YESNO_FIRST_WEIGHT: Final = 0.8

# (category, weight, substring alternatives) for scripts without spaces between words.
_CJK_CUES: Final = (
    ("translation", 4.0, "翻译|翻譯|翻訳|번역"),
    ("summarization", 4.0, "要約|总结|總結|概括|摘要|要点|요약"),
    ("sql", 3.0, "クエリ|查询|数据库|データベース|テーブル"),
    ("code", 2.5, "関数|函数|代码|コード|程序|プログラム"),
    ("math", 2.5, "计算|等于|方程|乘以|除以|加上|减去|計算|方程式"),
    ("questions", 1.3, "为什么|為什麼|什么|怎么|なぜ|どうして|ですか"),
)

_DIGITS: Final = tuple("0123456789")
_ALWAYS: Final = ("",)

# (category, weight, cap, gate, lower, pattern): structural cues. A pattern runs only when
# one of the `gate` substrings is in the text (a cheap C-level scan), on the lower-cased
# text when `lower`, else on the original. Patterns start with a literal or a character
# class, not with \b or a lookbehind, where they can: `re` then scans for their first
# character fast instead of trying the whole pattern at every position.
_PATTERNS: Final = (
    # code
    ("code", 2.5, 1, ("```",), False, r"```"),
    ("code", 0.7, 4, ("{", "}", ";"), False, r"[{};]"),
    ("code", 1.5, 2, ("(",), False, r"(?:def|fn) \w+\s*\(|function\s*\w*\s*\("),
    ("code", 1.0, 2, ("=",), False, r"(?:const|let|var)\s+\w+\s*="),
    ("code", 0.8, 3, _ALWAYS, False, r"=>|->|::|\+\+|&&|\|\||!=|==|\+="),
    ("code", 0.8, 3, (".",), False, r"\.[A-Za-z_]\w*\("),
    ("code", 0.8, 2, ("()",), False, r"\(\)"),
    (
        "code",
        1.5,
        2,
        ("import", "from", "#include", "using", "package", "require"),
        False,
        r"(?m)^\s*(?:import|from|#include|using|package|require)\s+[\w.<>\"']+",
    ),
    ("code", 1.0, 2, ("<",), False, r"</?[a-z][a-z0-9]*(?:\s[^<>]*)?>"),
    ("code", 1.0, 3, ("    ", "\t"), False, r"(?m)^(?: {4}|\t)\S"),
    ("code", 1.0, 3, _ALWAYS, False, r"[a-z][A-Z][a-z]"),  # camelCase
    ("code", 2.5, 1, ("Error", "Exception"), False, r"(?:Error|Exception)\b"),
    ("code", 2.0, 1, ("O(",), False, r"O\((?:n|1|log|m)\b"),
    (
        "code",
        3.0,
        1,
        ("C",),
        False,
        r"C(?:\+\+|#| (?:program|code|func)|"
        r"(?<=\bin C)\b|(?<=\ben C)\b|(?<=\bmy C)\b|(?<=auf C)\b)",
    ),
    ("code", 0.7, 2, ("`",), False, r"`[^`\n]+`"),
    ("code", 0.3, 3, ("_",), False, r"[a-z]_[a-z]"),  # snake_case
    # sql
    (
        "sql",
        3.0,
        1,
        ("SELECT", "select"),
        False,
        r"SELECT\b|select\s+(?:\*|distinct\b|count\(|[\w.]+\s*(?:,|\bfrom\b))",
    ),
    (
        "sql",
        1.0,
        4,
        _ALWAYS,
        False,
        r"(?:FROM|WHERE|JOIN|GROUP BY|ORDER BY|HAVING|INSERT INTO|UPDATE|DELETE FROM|"
        r"CREATE TABLE|CREATE INDEX|ALTER TABLE|LIMIT|UNION|COUNT|ON DELETE|MERGE|VALUES|"
        r"EXPLAIN|COALESCE|TRUNCATE|DELETE|INSERT|DROP TABLE|PRIMARY KEY|FOREIGN KEY)\b",
    ),
    # a table given as name(id, customer_id, ...)
    (
        "sql",
        2.5,
        2,
        ("id",),
        False,
        r"\((?=[^()]*\b(?:id|\w+_id|\w+_at)\b)\s*\w+(?:\s*,\s*\w+)+\s*\)",
    ),
    ("sql", 1.0, 1, ("--",), False, r"(?m)^\s*--\s"),
    (
        "sql",
        2.0,
        1,
        (" table",),
        True,
        r"(?:from|in|into|of|to|alter|update) (?:the|a|my|this|our) \w+ table\b",
    ),
    # math
    (
        "math",
        1.5,
        3,
        _DIGITS,
        False,
        r"(?<![\d-])\d+\s*[-+*/^\u00d7\u00f7\u2212]\s*\(?\s*\d+(?![\d-])",
    ),
    ("math", 2.0, 2, ("^", "**"), False, r"[a-z\d)]\s*(?:\^|\*\*)\s*[\da-z(]"),  # x^2, e^x
    ("math", 2.0, 2, _DIGITS, False, r"\d[a-z]\s*[-+=\u2212]|\s[a-z]\s*=\s*-?\d"),  # 3x + 7, x = 5
    ("math", 1.5, 1, ("dx", "dy", "dt"), False, r"(?:\s|/)d[xyt]\b"),
    ("math", 1.5, 2, _ALWAYS, False, r"[²³√∫∑∏π∞≤≥≠±·\u00d7\u00f7]"),
    (
        "math",
        3.0,
        1,
        ("\\",),
        False,
        r"\\(?:frac|int|sum|sqrt|lim|infty|pi|sin|cos|cdot|times|alpha|theta)\b",
    ),
    ("math", 1.5, 2, ("(",), True, r"(?:sin|cos|tan|log|ln|exp|sqrt)\s*\("),
    ("math", 2.0, 1, ("(x", "( x", "dx", "[["), False, r"f\s*\(\s*x\s*\)|dy\s*/\s*dx|\[\["),
    ("math", 1.0, 1, ("%",), False, r"\d\s*%"),
    # numbers of a word problem ("3 for $2", "12 days"); not years, dates, times, versions
    (
        "math",
        0.6,
        3,
        _DIGITS,
        False,
        r"(?<![\w.\-/:])(?!(?:19|20)\d\d\b)\d+(?:[.,]\d+)?(?!\w|\.\d|[-/:]\d)",
    ),
    (
        "math",
        2.0,
        1,
        _DIGITS,
        True,
        r"(?:what is|what's|how much is|calculate|compute)\s+[-(\d]",
    ),
    ("math", 2.0, 1, ("$",), False, r"\$[^$\n]{1,80}\$"),
    ("math", 1.0, 1, ("!",), False, r"\d!"),
    # translation: "English: ...\nFrench:"
    ("translation", 2.0, 2, (":",), True, r"(?m)^(?:" + "|".join(_LANGS) + r")\s*:"),
    (
        "translation",
        0.5,
        1,
        _ALWAYS,
        False,
        r"['\"«„“\u2018][^'\"»“”\u2019\n]{2,200}['\"»“”\u2019]",
    ),
    # questions
    ("questions", 0.8, 1, ("?", "\uff1f"), False, r"[?\uff1f]"),  # "\uff1f": fullwidth "?"
)

_TOKEN: Final = re.compile(r"[^\W\d_\u3000-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]+|\d+")
_FIRST_WORD: Final = re.compile(r"[^\W\d_]+")


class PromptClassifier:
    """Names the task of a request: one of the configured categories, or "other".

    `categories` must include "other". Categories without cues here are never produced;
    a result outside the configured set becomes "other". Never raises on a payload.
    """

    def __init__(self, categories: Iterable[str] = DEFAULT_CATEGORIES) -> None:
        configured = frozenset(categories)
        if FALLBACK not in configured:
            raise ValueError("the category set must include 'other' (the fallback)")
        self.categories: frozenset[str] = configured
        # Index in PRIORITY -> the name to report (a non-configured winner becomes other).
        self._report: tuple[str, ...] = tuple(c if c in configured else FALLBACK for c in PRIORITY)
        index = {c: i for i, c in enumerate(PRIORITY)}
        self._questions = index["questions"]
        self._summarization = index["summarization"]
        self._cues = _CueTable.build(_CUES, index)
        self._chat_cues = _CueTable.build(_CHAT_CUES, index)
        self._patterns: tuple[_Pattern, ...] = tuple(
            _Pattern(re.compile(p), index[cat], w, cap, _any_of(gate), lower)
            for cat, w, cap, gate, lower, p in _PATTERNS
        )
        self._cjk: tuple[tuple[re.Pattern[str], int, float], ...] = tuple(
            (re.compile(p), index[cat], w) for cat, w, p in _CJK_CUES
        )

    # --- public ---------------------------------------------------------------------------

    def classify_text(self, text: str) -> str:
        """The category of one user text."""
        if not isinstance(text, str):
            return FALLBACK
        return self._classify((), [text])

    def classify_payload(self, payload: Any) -> str:
        """The category of an OpenAI request body (chat, completions or embeddings)."""
        try:
            if not isinstance(payload, dict):
                return FALLBACK
            if "messages" in payload:
                return self._classify_chat(payload["messages"])
            if "prompt" in payload:
                return self._classify_prompt(payload["prompt"])
            if "input" in payload:
                return self._classify_prompt(payload["input"])
        except Exception:  # a classifier must never fail a request
            return FALLBACK
        return FALLBACK

    # --- payload shapes -------------------------------------------------------------------

    def _classify_chat(self, messages: Any) -> str:
        if not isinstance(messages, list):
            return FALLBACK
        user: list[str] = []
        for msg in reversed(messages[-MAX_MESSAGES_SCANNED:]):
            if isinstance(msg, dict) and msg.get("role") == "user":
                user = _content_texts(msg.get("content"))
                break
        if not user:
            return FALLBACK
        system: list[str] = []
        for msg in messages[:MAX_MESSAGES_SCANNED]:
            if isinstance(msg, dict) and _is_system(msg.get("role")):
                system.extend(_content_texts(msg.get("content")))
                if len(system) >= MAX_PARTS:
                    break
        return self._classify(system[:MAX_PARTS], user)

    def _classify_prompt(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return self._classify((), [prompt])
        if isinstance(prompt, list) and prompt:
            head = prompt[:MAX_PARTS]
            if all(isinstance(p, str) for p in head):
                return self._classify((), head)
        return FALLBACK  # token ids, empty or mixed lists

    # --- scoring --------------------------------------------------------------------------

    def _classify(self, system: Sequence[str], user: Sequence[str]) -> str:
        scores = self._scores(system, user)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if scores[best] < MIN_SCORE:
            return FALLBACK
        return self._report[best]

    def _scores(self, system: Sequence[str], user: Sequence[str]) -> list[float]:
        """One score per category of PRIORITY.

        What the text is about saturates (`_saturate`); the cues that say what to do with
        it are added on top: the instruction line of a paste, chit-chat in a short text,
        an interrogative first word, and a long text's lean towards summarization.
        """
        scores = [0.0] * len(PRIORITY)
        user_text = _clip("\n".join(_clip(p, PART_HEAD_CHARS, PART_TAIL_CHARS) for p in user))
        stripped = user_text.strip()
        if not stripped:
            return scores
        seen: set[str] = set()
        if len(user_text) > FOCUS_MIN_CHARS:
            focus = user_text[:FOCUS_HEAD_CHARS] + "\n" + user_text[-FOCUS_TAIL_CHARS:]
            body = user_text[FOCUS_HEAD_CHARS:-FOCUS_TAIL_CHARS]
        else:
            focus, body = user_text, ""
        if system:
            sys_text = "\n".join(p[:SYSTEM_MAX_CHARS] for p in system)[:SYSTEM_MAX_CHARS]
            focus = sys_text + "\n" + focus
        self._score_patterns(focus, scores)
        self._score_words(focus, 1.0, scores, seen)
        if body:  # pasted material: its words count a little, its patterns not at all
            self._score_words(body, BODY_WEIGHT, scores, seen)
        scores = [_saturate(x) for x in scores]
        if len(stripped) <= CHAT_MAX_CHARS:
            chat = [0.0] * len(scores)
            self._score_words(stripped, 1.0, chat, set(), self._chat_cues)
            for i, x in enumerate(chat):
                scores[i] += min(x, CHAT_MAX_SCORE)
        elif len(stripped) >= INSTRUCTION_MIN_CHARS and "\n" in stripped:
            # A paste with an instruction line before or after it: the instruction says
            # what to do with the paste, so its cues count again.
            first, _, rest = stripped.partition("\n")
            last = rest.rpartition("\n")[2]
            lines = first[:INSTRUCTION_MAX_CHARS] + "\n" + last[-INSTRUCTION_MAX_CHARS:]
            self._score_words(lines, INSTRUCTION_WEIGHT, scores, set())
        first_word = _FIRST_WORD.search(stripped)
        if first_word is not None:
            word = first_word.group().lower()
            if word in _WH_FIRST:
                scores[self._questions] += WH_FIRST_WEIGHT
            elif word in _YESNO_FIRST:
                scores[self._questions] += YESNO_FIRST_WEIGHT
        if len(stripped) >= LONG_TEXT_CHARS:
            scores[self._summarization] += LONG_TEXT_BONUS
        return scores

    def _score_patterns(self, text: str, scores: list[float]) -> None:
        """Adds the weights of the structural patterns and CJK cues found in `text`."""
        lower = text.lower()
        for p in self._patterns:
            subject = lower if p.lower else text
            if p.gate.search(subject) is None:
                continue
            n = 0
            for _ in p.regex.finditer(subject):
                n += 1
                if n >= p.cap:
                    break
            scores[p.category] += p.weight * n
        if not text.isascii():
            for regex, cat, w in self._cjk:
                if regex.search(text) is not None:
                    scores[cat] += w

    def _score_words(
        self,
        text: str,
        weight: float,
        scores: list[float],
        seen: set[str],
        table: _CueTable | None = None,
    ) -> None:
        """Adds `weight` times the weights of the cues found in `text`, each cue once."""
        t = self._cues if table is None else table
        cues, stems, lengths = t.cues, t.stems, t.stem_lengths
        bi_heads, tri_heads, quad_heads = t.phrase_heads
        min_stem = lengths[0] if lengths else 1 << 30
        p1 = p2 = p3 = ""
        for tok in _TOKEN.findall(text.lower()):
            if tok in cues:
                _add(tok, cues[tok], weight, scores, seen)
            if p1 in bi_heads:
                key = p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if p2 in tri_heads:
                key = p2 + " " + p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if p3 in quad_heads:
                key = p3 + " " + p2 + " " + p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if len(tok) >= min_stem:
                for n in lengths:
                    if n > len(tok):
                        break
                    stem = tok[:n]
                    if stem in stems:
                        _add(stem + "*", stems[stem], weight, scores, seen)
            p3, p2, p1 = p2, p1, tok


def _saturate(score: float) -> float:
    if score <= SATURATION_KNEE:
        return score
    return SATURATION_KNEE + (score - SATURATION_KNEE) * SATURATION_SLOPE


def _add(
    key: str,
    hits: tuple[tuple[int, float], ...],
    weight: float,
    scores: list[float],
    seen: set[str],
) -> None:
    if key not in seen:
        seen.add(key)
        for cat, w in hits:
            scores[cat] += weight * w


def _any_of(substrings: tuple[str, ...]) -> re.Pattern[str]:
    """One C-level scan for "any of these substrings" (a generator of `in` tests costs
    more than the pattern it guards on a short prompt)."""
    if not substrings:
        raise ValueError("a pattern needs at least one gate substring")
    return re.compile("|".join(re.escape(g) for g in substrings))


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    category: int  # index in PRIORITY
    weight: float
    cap: int  # counted at most this many times
    gate: re.Pattern[str]  # run only if one of its substrings is in the text
    lower: bool  # run on the lower-cased text


@dataclass(frozen=True, slots=True)
class _CueTable:
    """Cue tables compiled for lookups: whole words and phrases, and prefix stems."""

    cues: dict[str, tuple[tuple[int, float], ...]]
    stems: dict[str, tuple[tuple[int, float], ...]]
    stem_lengths: tuple[int, ...]  # ascending
    # First words of the 2-, 3- and 4-word phrases: a phrase is looked up only when the
    # token that would start it is one of these.
    phrase_heads: tuple[frozenset[str], frozenset[str], frozenset[str]]

    @classmethod
    def build(
        cls, tiers: Mapping[str, tuple[tuple[float, str], ...]], index: Mapping[str, int]
    ) -> _CueTable:
        cues: dict[str, list[tuple[int, float]]] = {}
        stems: dict[str, list[tuple[int, float]]] = {}
        for cat, cat_tiers in tiers.items():
            for weight, alternatives in cat_tiers:
                for raw in alternatives.split("|"):
                    if raw.endswith("*"):
                        stems.setdefault(raw[:-1], []).append((index[cat], weight))
                    elif cue := " ".join(_TOKEN.findall(raw.lower())):
                        cues.setdefault(cue, []).append((index[cat], weight))
        heads = [frozenset(k.split(" ")[0] for k in cues if k.count(" ") == n) for n in (1, 2, 3)]
        return cls(
            cues={k: tuple(v) for k, v in cues.items()},
            stems={k: tuple(v) for k, v in stems.items()},
            stem_lengths=tuple(sorted({len(s) for s in stems})),
            phrase_heads=(heads[0], heads[1], heads[2]),
        )


def _content_texts(content: Any) -> list[str]:
    """The text parts of a message's content: a string, or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content[: 4 * MAX_PARTS]:  # images and audio parts are skipped
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
            elif isinstance(part, str):
                out.append(part)
            if len(out) >= MAX_PARTS:
                break
    return out


def _is_system(role: Any) -> bool:
    return isinstance(role, str) and role in _SYSTEM_ROLES


def _clip(text: str, head: int = USER_HEAD_CHARS, tail: int = USER_TAIL_CHARS) -> str:
    """The first `head` and last `tail` characters of `text`."""
    if len(text) <= head + tail:
        return text
    return text[:head] + "\n" + text[-tail:]
