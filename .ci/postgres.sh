#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on localhost for the case-log tests and print its URL.
# Installs Debian's postgresql when missing. PostgreSQL refuses to run as root, so the
# cluster belongs to the 'postgres' system user that the Debian package creates.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
data=$(mktemp -d /tmp/leuko-pg.XXXXXX)
port=${LEUKO_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
chown postgres "$data"
su postgres -s /bin/sh -c "'$bin/initdb' -D '$data' -U leuko --auth=trust -E UTF8" >&2
su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$data' -o '-p $port -k /tmp -h 127.0.0.1' -l '$data/log' -w start" >&2
su postgres -s /bin/sh -c "'$bin/createdb' -h 127.0.0.1 -p $port -U leuko leuko_test" >&2
echo "postgresql+psycopg://leuko@127.0.0.1:$port/leuko_test"
echo "$bin/pg_ctl -D $data stop" > "$data/stop-command"
echo "$bin/pg_ctl -D $data -o '-p $port -k /tmp -h 127.0.0.1' -l $data/log -w start" > "$data/start-command"
