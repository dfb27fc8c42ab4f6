"""The Apache Beam pipelines of `lory build-corpus`, built from `lorydata` blocks.

Stages in order (see `pipelines/README.md` for what each reads and writes and how to add
one): `documents`, `embed`, `order`, `shards`; `build_corpus` runs them, `layout` names their
files, `runner` runs their Beam steps.
"""
