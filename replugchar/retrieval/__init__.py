"""Serving: the FAISS index, the ``Retriever``, the export folder's format, the LangChain adapter.

Never imports training code or Lightning: a RAG stack that loads an export needs none of it.
"""
