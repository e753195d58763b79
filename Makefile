# pymta — two commands on a fresh machine:
#   make run    create .venv, install, start the server on the embedded default
#   make test   create .venv, install test extras and external programs, run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-programs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd -n --pidfile= pymta $(ARGS)

# External programs the tests drive: swaks, and Postfix as a real receiving MTA
# (a private instance the tests start on a loopback port; debconf is preseeded
# to "No configuration", so the system's own Postfix is not set up), and HAProxy
# as the load balancer in front of pymta (a private instance in the foreground,
# own config, loopback ports; the PROXY protocol tests), Dovecot as the
# mail store (LMTP) and password service (AUTH): a private instance in the
# foreground with its own config and sockets in a temp dir (tests/dovecotkit.py);
# a policy-rc.d keeps the package from starting the system's Dovecot,
# redis-server for the state shared between nodes (a private instance on a
# loopback port, nothing saved; the greylist and rate-limit tests), systemd's
# systemd-analyze and systemd-socket-activate (the units in etc/, socket
# activation; systemd is not started) and logrotate (etc/logrotate.d/pymta).  Installed
# with apt when root; otherwise they must already be on PATH (the tests say
# which one is missing).
test-programs:
	@if ! command -v swaks >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq swaks >/dev/null; \
	  else echo "swaks is missing: apt-get install swaks (as root)"; fi; \
	fi
	@if ! command -v postfix >/dev/null 2>&1 && [ ! -x /usr/sbin/postfix ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null; \
	  else echo "postfix is missing: apt-get install postfix (as root)"; fi; \
	fi
	@if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
	  else echo "haproxy is missing: apt-get install haproxy (as root)"; fi; \
	fi
	@if [ ! -x /usr/sbin/dovecot ] || [ ! -x /usr/lib/dovecot/lmtp ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    made_policy=; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1; \
	    fi; \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
	      dovecot-core dovecot-lmtpd >/dev/null; rc=$$?; \
	    if [ -n "$$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	    exit $$rc; \
	  else echo "dovecot is missing: apt-get install dovecot-core dovecot-lmtpd (as root)"; fi; \
	fi
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 redis-server >/dev/null; \
	  else echo "redis-server is missing: apt-get install redis-server (as root)"; fi; \
	fi
	@if ! command -v systemd-analyze >/dev/null 2>&1 || ! command -v systemd-socket-activate >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq systemd >/dev/null; \
	  else echo "systemd-analyze is missing: apt-get install systemd (as root)"; fi; \
	fi
	@if ! command -v logrotate >/dev/null 2>&1 && [ ! -x /usr/sbin/logrotate ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq logrotate >/dev/null; \
	  else echo "logrotate is missing: apt-get install logrotate (as root)"; fi; \
	fi

test: $(STAMP) test-programs
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests ran" && exit 1; exit $$rc; }

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
