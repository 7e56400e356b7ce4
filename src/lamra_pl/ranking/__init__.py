"""The retrieval maths, on arrays and files only: exact top-k search, M-BEIR's metrics, score fusion."""
