"""The modules flows are composed from (rag.flows holds the registry and the interpreter):
`state` (what a running flow carries), `text` (words, stopwords, sentences, token spans), `query`
(rewrite), `retrieval` (retrieve, fuse, rerank), `generation` (prompting and generate), `flare`
(look-ahead, confidence routing, commit). DRAGIN's round lives in rag.dragin."""
