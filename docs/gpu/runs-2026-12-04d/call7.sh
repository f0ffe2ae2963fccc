# Call 7: does the GPU host's own Python have tiktoken (which the kit's venv reads after its own wheels)?
ls /opt/torch/.venv/lib/python3.12/site-packages | grep -i -E "^tiktoken|^tokenizers|^regex" ; python3 -c "import tiktoken; print(tiktoken.__version__, tiktoken.__file__)"
# Output:
# regex
# regex-2026.9.3.dist-info
# tiktoken
# tiktoken-0.14.0.dist-info
# tiktoken_ext
# tokenizers
# tokenizers-0.23.2.dist-info
# 0.14.0 /opt/torch/.venv/lib/python3.12/site-packages/tiktoken/__init__.py
