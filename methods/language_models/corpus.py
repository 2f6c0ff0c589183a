"""Code corpus with planted secrets (CodeEraser's CPU plan): standard-library Python source.

Samples are runs of consecutive lines of real stdlib files. A secret-bearing sample gets one
assignment ``NAME = "<secret>"`` inserted at a random line near its top; the secret follows a
known pattern (AWS access key ``AKIA[0-9A-Z]{16}``, GitHub token ``ghp_[A-Za-z0-9]{36}``, e-mail,
IPv4, password). Its character span gives the token-level secret mask
    s_t = 1  iff token t overlaps the span   (tokenizer offsets),
so the secret prefix is the tokens before the first s_t = 1 and the secret the s_t = 1 tokens.
The split: a pool of secret-bearing samples (repeated in pretraining until memorized; each seed
draws its forget set from it), a retain set (repeated, no secrets), a background set (seen
once) and held-out samples (never seen: "forgotten" thresholds and utility).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from methods.language_models.tokenizer import stdlib_source_texts

CODE_PACKAGES = ("json", "email", "http", "logging", "urllib", "concurrent", "wsgiref", "html", "xml")

_FIRST = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
_LAST = ("smith", "jones", "brown", "miller", "davis", "garcia", "wilson", "moore", "taylor", "lee")
_DOMAINS = ("example.com", "corp.net", "mail.org", "internal.io", "acme.dev")


def _chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


SECRET_KINDS = {
    "aws_key": ("AWS_ACCESS_KEY_ID", lambda r: "AKIA" + _chars(r, string.ascii_uppercase + string.digits, 16)),
    "github_token": ("GITHUB_TOKEN", lambda r: "ghp_" + _chars(r, string.ascii_letters + string.digits, 36)),
    "email": ("ADMIN_EMAIL", lambda r: f"{r.choice(_FIRST)}.{r.choice(_LAST)}{r.randint(1, 99)}@{r.choice(_DOMAINS)}"),
    "ipv4": ("DB_HOST", lambda r: ".".join(str(r.randint(1, 254)) for _ in range(4))),
    "password": ("DB_PASSWORD", lambda r: _chars(r, string.ascii_letters + string.digits + "!#$%&*+-=?@^_", 12)),
}


@dataclass(frozen=True)
class Sample:
    text: str
    span: tuple[int, int] | None = None  # character span of the secret
    kind: str | None = None


def code_snippets(packages: tuple[str, ...] = CODE_PACKAGES, lines: int = 12, min_chars: int = 200) -> list[str]:
    """Non-overlapping runs of ``lines`` lines of stdlib source with at least ``min_chars`` characters."""
    out = []
    for package in packages:
        for source in stdlib_source_texts(package):
            rows = source.splitlines()
            for start in range(0, len(rows) - lines + 1, lines):
                chunk = "\n".join(rows[start : start + lines]) + "\n"
                if len(chunk.strip()) >= min_chars:
                    out.append(chunk)
    return out


def plant_secret(snippet: str, kind: str, rng: random.Random, max_line: int = 3) -> Sample:
    """Insert ``NAME = "secret"`` after line i ∈ [1, max_line], indented like the next line."""
    name, draw = SECRET_KINDS[kind]
    secret = draw(rng)
    rows = snippet.splitlines(keepends=True)
    at = rng.randint(1, min(max_line, len(rows) - 1))
    indent = rows[at][: len(rows[at]) - len(rows[at].lstrip())] if rows[at].strip() else ""
    head = "".join(rows[:at])
    line_start = f'{indent}{name} = "'
    start = len(head) + len(line_start)
    text = head + line_start + secret + '"\n' + "".join(rows[at:])
    return Sample(text=text, span=(start, start + len(secret)), kind=kind)


def encode(tokenizer: PreTrainedTokenizerFast, samples: list[Sample], block: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of ``block`` tokens: input_ids, attention_mask and secret_mask (bool)."""
    ids = torch.full((len(samples), block), tokenizer.pad_token_id, dtype=torch.long)
    secret = torch.zeros(len(samples), block, dtype=torch.bool)
    for row, sample in enumerate(samples):
        enc = tokenizer(sample.text, return_offsets_mapping=True, truncation=True, max_length=block)
        ids[row, : len(enc["input_ids"])] = torch.tensor(enc["input_ids"])
        if sample.span is not None:
            lo, hi = sample.span
            for t, (a, b) in enumerate(enc["offset_mapping"]):
                secret[row, t] = a < hi and b > lo
    return {"input_ids": ids, "attention_mask": (ids != tokenizer.pad_token_id).long(), "secret_mask": secret}


@dataclass
class CodeCorpus:
    """Token rows of each split (dicts from :func:`encode`) and the secret kinds of the pool."""

    secret_pool: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor]
    background: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    kinds: list[str]

    def pretraining_rows(self, repeats: int) -> torch.Tensor:
        """Secret pool and retain set repeated ``repeats`` times, plus the background once."""
        parts = [self.secret_pool["input_ids"]] * repeats + [self.retain["input_ids"]] * repeats
        return torch.cat(parts + [self.background["input_ids"]])


def build_code_corpus(tokenizer: PreTrainedTokenizerFast, snippets: list[str], *, n_secret: int, n_retain: int,
                      n_background: int, n_heldout: int, block: int, seed: int = 0) -> CodeCorpus:
    """Shuffle the snippets with ``seed`` and cut the four splits; secrets cycle over the kinds."""
    rng = random.Random(seed)
    pool = list(snippets)
    rng.shuffle(pool)
    need = n_secret + n_retain + n_background + n_heldout
    if len(pool) < need:
        raise ValueError(f"{len(pool)} snippets, {need} needed")
    kinds = [list(SECRET_KINDS)[i % len(SECRET_KINDS)] for i in range(n_secret)]
    secret, used = [], 0
    for snippet in pool[: len(pool) - (need - n_secret)]:  # skip files whose secret would pass the block
        if len(secret) == n_secret:
            break
        used += 1
        sample = plant_secret(snippet, kinds[len(secret)], rng)
        mask = encode(tokenizer, [sample], block)["secret_mask"][0]
        if mask.any() and not mask[-1]:  # the whole secret lies within the block
            secret.append(sample)
    if len(secret) < n_secret:
        raise ValueError(f"only {len(secret)} planted secrets fit in {block} tokens; raise block")
    rest = [Sample(s) for s in pool[used : used + need - n_secret]]
    cut = [n_retain, n_retain + n_background]
    rows = encode(tokenizer, secret, block)
    return CodeCorpus(secret_pool=rows, retain=encode(tokenizer, rest[: cut[0]], block),
                      background=encode(tokenizer, rest[cut[0] : cut[1]], block),
                      heldout=encode(tokenizer, rest[cut[1] :], block), kinds=kinds)


def subset(rows: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in rows.items()}


DOC_MODULES = ("json", "logging", "argparse", "textwrap", "string", "pathlib", "shutil", "subprocess", "threading",
               "unittest", "inspect", "typing", "datetime", "csv", "random", "statistics", "functools", "itertools",
               "tarfile", "zipfile", "socket", "smtplib", "calendar", "difflib", "fractions", "decimal", "heapq",
               "queue", "tempfile", "pickle", "enum", "dataclasses", "contextlib", "io", "codecs", "configparser",
               "hashlib", "uuid", "base64", "ipaddress", "mailbox", "email.message", "http.client",
               "urllib.parse", "urllib.request", "collections", "asyncio", "xml.dom.minidom", "html.parser")


def stdlib_docstrings(modules: tuple[str, ...] = DOC_MODULES, min_words: int = 20) -> list[str]:
    """Docstrings (whitespace-normalised) of the functions, classes and methods of stdlib modules."""
    import importlib
    import inspect

    seen: dict[str, None] = {}
    for name in modules:
        module = importlib.import_module(name)
        objects = [obj for _, obj in sorted(vars(module).items()) if inspect.isfunction(obj) or inspect.isclass(obj)]
        objects += [m for cls in objects if inspect.isclass(cls) for _, m in sorted(vars(cls).items())
                    if inspect.isfunction(m)]
        for obj in objects:
            doc = " ".join((inspect.getdoc(obj) or "").split())
            if len(doc.split()) >= min_words:
                seen.setdefault(doc)
    return list(seen)
