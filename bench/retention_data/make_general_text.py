"""Rebuilds the general-text slice of the retention benchmark (general_devils_dictionary.txt and
general_jargon_file.txt) from Debian's dict-devil and dict-jargon packages, both public-domain texts.

    apt-get download dict-devil dict-jargon
    python bench/retention_data/make_general_text.py dict-devil_*.deb dict-jargon_*.deb

The cleaning is deterministic: the dictd headers and licence notices are cut (README.md here keeps them),
paragraphs are reflowed onto one line each (verse keeps its lines), the Jargon File's {cross-reference} braces
and its box-drawn tables are removed, and the text is folded to ASCII so that a byte-level tokenizer sees
plain English.
"""

import gzip
import os
import re
import subprocess
import sys
import tempfile
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
PUNCTUATION = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": " -- ", "\u2013": "-", "\u00b7": "-",
               "\u00b4": "'", "\u00ad": "", "\u00a0": " ", "\u2122": "(TM)", "\u00d7": "x", "\u2026": "..."}


def ascii_fold(text: str) -> str:
    text = "".join(PUNCTUATION.get(c, c) for c in text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def paragraphs(text: str):
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def squeeze(line: str) -> str:
    return re.sub(r"[ \t]+", " ", line).strip()


def devils_dictionary(raw: str) -> str:
    raw = raw[raw.index("PREFACE"):]
    out = []
    for para in paragraphs(raw):
        lines = [line for line in para.split("\n") if line.strip()]
        if len(lines) == 1 and len(lines[0].strip()) < 30 and not lines[0].startswith(" " * 20):
            if re.fullmatch(r"[a-z]+", lines[0].strip()):  # the index's alphabet line at the end
                continue
        verse = all(line.startswith("    ") for line in lines)
        text = "\n".join(squeeze(line) for line in lines) if verse else " ".join(squeeze(line) for line in lines)
        out.append(ascii_fold(text))
    return "\n\n".join(out) + "\n"


def jargon_file(raw: str) -> str:
    raw = raw[raw.index("(TM)\n"):]
    out = []
    for para in paragraphs(raw):
        if re.search("[\u2500-\u257f\u25a0-\u25ff]", para):  # box-drawn tables and symbols
            continue
        text = " ".join(squeeze(line) for line in para.split("\n") if line.strip())
        text = text.replace("{", "").replace("}", "").replace(" //", "")
        text = squeeze(ascii_fold(text))
        if text and not (" " not in text and len(text) > 30):  # the index's character list at the end
            out.append(text)
    return "\n\n".join(out) + "\n"


def dict_text(deb: str, name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        with gzip.open(os.path.join(tmp, "usr", "share", "dictd", f"{name}.dict.dz"), "rt", encoding="utf-8") as f:
            return f.read()


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    devil_deb, jargon_deb = sys.argv[1:]
    for deb, name, clean, out in ((devil_deb, "devil", devils_dictionary, "general_devils_dictionary.txt"),
                                  (jargon_deb, "jargon", jargon_file, "general_jargon_file.txt")):
        text = clean(dict_text(deb, name))
        with open(os.path.join(HERE, out), "w", encoding="ascii", newline="\n") as f:
            f.write(text)
        print(f"{out}: {len(text):,} bytes")


if __name__ == "__main__":
    main()
