# Sourced by `make test` (and so by .ci/run): use the machine's PostgreSQL and Redis when they answer and
# DATABASE_URL / REDIS_URL are unset, so a plain `make test` runs the same suite as CI. With neither there,
# the suite runs on SQLite with the in-process fallbacks (the Redis-only tests are skipped).
if [ -z "${DATABASE_URL:-}" ] && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
fi
if [ -z "${REDIS_URL:-}" ] && (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  # Database 9 keeps the tests away from a development stack on database 0; keys are prefixed per run too.
  export REDIS_URL="redis://127.0.0.1:6379/9"
fi
echo "tests: DATABASE_URL=${DATABASE_URL:-<sqlite>} REDIS_URL=${REDIS_URL:-<unset>}"
