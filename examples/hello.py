# A script for `drover pack`: it imports only the standard library, so its
# environment builds without a package index.
import json
import sys

print(json.dumps({"hello": "from a packed environment", "python": sys.version.split()[0]}))
