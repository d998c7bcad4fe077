"""Builds the bundled English corpus: ``train.txt`` and ``validation.txt``.

Sources (both work offline, both real English prose):

* ~106 Wikipedia articles shipped inside the ``gensim`` wheel as a test fixture
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
  shortened.bz2``), CC BY-SA 3.0 -- see ``ATTRIBUTION.md``. The wheel is read as a
  zip file; nothing is installed.
* The help topics of Python's own documentation (``pydoc_data.topics``), PSF licence.

Wiki markup is stripped, the text is split into paragraphs, one paragraph per line
(SentencePiece silently drops lines over 4,192 bytes, so long paragraphs are split at
sentence boundaries). Every ``VALIDATION_EVERY``-th document goes to validation.

Usage::

    pip download --no-deps gensim==4.4.0 -d /tmp/gensim
    python -m ul2.assets.build_corpus --gensim_wheel /tmp/gensim/gensim-4.4.0-*.whl
"""

from __future__ import annotations

import argparse
import bz2
import html
import pathlib
import re
import xml.etree.ElementTree as ET
import zipfile

WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
MAX_LINE_BYTES = 4000
MIN_PARAGRAPH_WORDS = 8
VALIDATION_EVERY = 12
HERE = pathlib.Path(__file__).parent


def _strip_nested(text: str, open_: str, close: str) -> str:
  """Removes (possibly nested) ``open_ ... close`` blocks, e.g. ``{{templates}}``."""
  out, depth, i = [], 0, 0
  while i < len(text):
    if text.startswith(open_, i):
      depth += 1
      i += len(open_)
    elif depth and text.startswith(close, i):
      depth -= 1
      i += len(close)
    else:
      if not depth:
        out.append(text[i])
      i += 1
  return "".join(out)


def _link(match: re.Match) -> str:
  target = match.group(1)
  if ":" in target.split("|")[0]:  # File:, Category:, interlanguage links.
    return ""
  return target.split("|")[-1]


def wiki_to_paragraphs(markup: str) -> list[str]:
  """Plain-text paragraphs of one article's wiki markup."""
  text = html.unescape(markup)
  text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
  text = re.sub(r"<ref[^>/]*/>", "", text)
  text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
  text = re.sub(r"<(math|gallery|timeline|source|syntaxhighlight|table)[^>]*>.*?</\1>",
                "", text, flags=re.S)
  text = _strip_nested(text, "{{", "}}")
  text = _strip_nested(text, "{|", "|}")
  # [[File:..[[nested]]..]] : drop the innermost links first, then the outer ones.
  for _ in range(3):
    text = re.sub(r"\[\[([^\[\]]*)\]\]", _link, text)
  text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
  text = re.sub(r"\[https?://[^\]]*\]", "", text)
  text = re.sub(r"<[^>]+>", "", text)
  text = re.sub(r"'{2,}", "", text)
  paragraphs = []
  for block in re.split(r"\n\s*\n", text):
    lines = [l.strip() for l in block.splitlines()]
    # Headings, lists, indented and table residue are not prose.
    lines = [l for l in lines
             if l and not l.startswith(("=", "*", "#", ":", ";", "|", "!", "[["))]
    para = re.sub(r"\s+", " ", " ".join(lines)).strip()
    para = re.sub(r"\(\s*[,;]?\s*\)", "", para).replace(" ,", ",").replace(" .", ".")
    if len(para.split()) >= MIN_PARAGRAPH_WORDS and "[[" not in para and "{{" not in para:
      paragraphs.append(para)
  return paragraphs


def wikipedia_documents(wheel: pathlib.Path) -> list[list[str]]:
  with zipfile.ZipFile(wheel) as zf:
    xml = bz2.decompress(zf.read(WIKI_MEMBER))
  docs = []
  for page in ET.fromstring(xml).iter():
    if not page.tag.endswith("}page"):
      continue
    ns = next(c.text for c in page if c.tag.endswith("}ns"))
    text = next((r.text for r in page.iter() if r.tag.endswith("}text")), None)
    if ns != "0" or not text or text.lstrip().lower().startswith("#redirect"):
      continue
    paragraphs = wiki_to_paragraphs(text)
    if paragraphs:
      docs.append(paragraphs)
  return docs


def pydoc_documents() -> list[list[str]]:
  return [paragraphs for _, paragraphs in pydoc_topics()]


def pydoc_topics() -> list[tuple[str, list[str]]]:
  """(title, paragraphs) of each help topic of Python's documentation, by topic name."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  docs = []
  for _, body in sorted(topics.topics.items()):
    title = body.splitlines()[0].strip()
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
      if block.startswith((" ", "\t")):  # Code samples and grammar.
        continue
      para = re.sub(r"\s+", " ", block).strip()
      if len(para.split()) >= MIN_PARAGRAPH_WORDS and not para.startswith(("*", "-")):
        paragraphs.append(para)
    if paragraphs:
      docs.append((title, paragraphs))
  return docs


def split_long(paragraph: str, limit: int = MAX_LINE_BYTES) -> list[str]:
  """Splits a paragraph at sentence ends so that each line is under `limit` bytes."""
  if len(paragraph.encode()) <= limit:
    return [paragraph]
  out, current = [], ""
  for sentence in re.split(r"(?<=[.!?]) ", paragraph):
    candidate = f"{current} {sentence}".strip()
    if current and len(candidate.encode()) > limit:
      out.append(current)
      candidate = sentence
    current = candidate
  out.append(current)
  return [l.encode()[:limit].decode(errors="ignore") for l in out]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gensim_wheel", type=pathlib.Path, required=True)
  parser.add_argument("--output_dir", type=pathlib.Path, default=HERE)
  args = parser.parse_args()
  docs = wikipedia_documents(args.gensim_wheel) + pydoc_documents()
  splits = {"train": [], "validation": []}
  seen = set()  # Paragraphs repeated across documents are kept once.
  for i, doc in enumerate(docs):
    split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
    for line in (line for para in doc for line in split_long(para)):
      if line not in seen:
        seen.add(line)
        splits[split].append(line)
  for split, lines in splits.items():
    path = args.output_dir / f"{split}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{path}: {len(lines)} lines, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
