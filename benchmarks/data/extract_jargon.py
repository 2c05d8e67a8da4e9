"""Write ``jargon-4.4.7.txt``, the second English text of the perplexity ranking (issue 18).

Source: Debian's ``dict-jargon`` package (4.4.7-3.1, ``apt-get install dict-jargon``), the
Jargon File 4.4.7 (29 Dec 2003) in dictd format: about 1.4 MB of English prose, public domain
(``LICENSE-jargon.txt``). The dictd database header (its first lines, up to the first entry) is
dropped; the entries are kept as they are (headword, pronunciation, indented definition), so
the text is the package's, byte for byte, after that point. Unlike WikiText-2 it is not
Wikipedia and was never a calibration text here.

    python benchmarks/data/extract_jargon.py   # needs dict-jargon installed
"""

from __future__ import annotations

import gzip
from pathlib import Path

SOURCE = Path("/usr/share/dictd/jargon.dict.dz")
TARGET = Path(__file__).with_name("jargon-4.4.7.txt")
FIRST_ENTRY = "(TM)\n"


def main() -> None:
    text = gzip.decompress(SOURCE.read_bytes()).decode("utf-8")
    start = text.index(FIRST_ENTRY) if FIRST_ENTRY in text else 0
    TARGET.write_text(text[start:], encoding="utf-8")
    print(f"{TARGET}: {len(text) - start} characters")


if __name__ == "__main__":
    main()
