"""The layout the README's file map describes, read from the source (every
``import``, also those inside functions, and every subprocess call):

- the top level holds the user's tools and ``nets.py``, nothing else;
- ``capsnet/`` is the library: it never imports a top-level file and never
  runs a program;
- ``nets.py`` imports only the library;
- no tool imports another tool, and no tool runs another tool;
- developer harnesses live in ``dev/``: they may import anything and run
  the tools as a user would, but nothing outside dev/ imports or runs them;
- no import cycles.
"""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {'train', 'visualize', 'evaluate', 'predict', 'experiments',
         'export'}
MODEL = {'nets'}
HARNESSES = {'benchmark', 'gpu_check', 'kernel_profile'}
# what a subprocess call may name: a Python file, or python -m a module
PROGRAM = ('.py', '-m')


def top_level():
    return {os.path.splitext(os.path.basename(p))[0]
            for p in glob.glob(os.path.join(REPO, '*.py'))}


def library():
    """{'capsnet.cli': path, ...} for every module of the package."""
    found = {}
    for path in glob.glob(os.path.join(REPO, 'capsnet', '**', '*.py'),
                          recursive=True):
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        found[name[:-len('.__init__')] if name.endswith('__init__')
              else name] = path
    return found


def harnesses():
    return {os.path.splitext(os.path.basename(p))[0]: p
            for p in glob.glob(os.path.join(REPO, 'dev', '*.py'))}


def source(module):
    if module in library():
        return library()[module]
    if module in harnesses():
        return harnesses()[module]
    return os.path.join(REPO, module + '.py')


def parse(module):
    with open(source(module)) as f:
        return ast.parse(f.read())


def imports(module):
    """Project modules (top-level names, capsnet.* modules, harnesses) that
    ``module`` imports anywhere in its source."""
    names = set()
    for node in ast.walk(parse(module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update('{}.{}'.format(node.module, alias.name)
                         for alias in node.names)
    known = top_level() | set(library()) | set(harnesses())
    return {name for name in names if name in known}


RUNNERS = ('subprocess', 'os.system', 'os.exec', 'os.spawn', 'runpy',
           'multiprocessing', 'sys.executable')


def tool_labels(tree):
    """ids of the constants given as a ``tool`` parameter (a default or a
    keyword argument): the name a lock file shows, not a program run."""
    labels = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == 'tool':
            labels.add(id(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(
                node.args.defaults)) + node.args.defaults + \
                node.args.kw_defaults
            labels.update(id(d) for a, d in zip(args, defaults)
                          if d is not None and a.arg == 'tool')
    return labels


def programs_run(module):
    """What in ``module`` can start a program: a string that is another
    program's file name ('train.py', '.../train.py'; a program naming
    itself in a message is not counted), and every use of subprocess,
    os.system / exec / spawn, runpy, multiprocessing or sys.executable
    (however the command is then built). A constant given as a ``tool``
    parameter, the label of a lock, is no program."""
    programs = {name + '.py' for name in top_level() | set(harnesses())}
    programs.discard(os.path.basename(source(module)))
    tree = parse(module)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and os.path.basename(node.value) in programs and \
                id(node) not in tool_labels(tree):
            found.add(node.value)
        if isinstance(node, (ast.Attribute, ast.Name)):
            text = ast.unparse(node)
            found.update(runner for runner in RUNNERS
                         if text == runner or text.startswith(runner + '.'))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [
                getattr(node, 'module', None) or '']
            found.update(runner for runner in RUNNERS
                         if any(name.split('.')[0] == runner
                                for name in names))
    return found


def test_the_top_level_is_the_tools_and_the_model():
    assert top_level() == TOOLS | MODEL


def test_the_harnesses_are_in_dev():
    assert set(harnesses()) == HARNESSES


@pytest.mark.parametrize('module', sorted(library()))
def test_the_library_imports_only_the_library(module):
    outside = {name for name in imports(module)
               if not name.startswith('capsnet')}
    assert not outside, '{} imports {}'.format(module, sorted(outside))


def test_nets_imports_only_the_library():
    assert {name for name in imports('nets')
            if not name.startswith('capsnet')} == set()


@pytest.mark.parametrize('module', sorted(TOOLS))
def test_no_tool_imports_a_tool_or_a_harness(module):
    bad = imports(module) & (TOOLS | HARNESSES)
    assert not bad, '{} imports {}'.format(module, sorted(bad))


@pytest.mark.parametrize('module', sorted(TOOLS | MODEL) + sorted(library()))
def test_no_tool_and_no_library_module_runs_a_program(module):
    assert programs_run(module) == set()


def test_no_import_cycles():
    modules = sorted(TOOLS | MODEL | set(library()) | set(harnesses()))
    graph = {module: imports(module) for module in modules}
    done, path = set(), []

    def visit(module):
        assert module not in path, 'cycle: ' + ' -> '.join(path + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module] & set(graph) - {module}):
            visit(imported)
        path.pop()
        done.add(module)

    for module in modules:
        visit(module)


def test_the_checker_sees_what_it_must():
    # the parser, not the layout, is what this checks: imports inside
    # functions, ``from capsnet import x`` as capsnet.x, and a harness
    # running a tool
    assert 'capsnet.kernels.convolution' in imports('benchmark')
    assert 'capsnet.cli' in imports('capsnet.data.mnist')
    assert {'train.py', 'subprocess', 'sys.executable'} <= programs_run(
        'gpu_check')


def test_files_of_the_tests():
    """The files that must hold each module's and each tool's tests."""
    assert file_of_tests('capsnet.cli') == 'test_cli.py'
    assert file_of_tests('capsnet.training.loop') == 'test_training_loop.py'
    assert file_of_tests('train') == 'test_train.py'
    assert file_of_tests('gpu_check') == 'test_dev_gpu_check.py'


def file_of_tests(module):
    """tests/test_<name>.py for capsnet/<a>/<b>.py (test_a_b.py), a tool
    or the model (test_train.py, test_nets.py) and a harness of dev/
    (test_dev_gpu_check.py)."""
    if module in harnesses():
        return 'test_dev_{}.py'.format(module)
    name = module[len('capsnet.'):] if module.startswith('capsnet.') \
        else module
    return 'test_{}.py'.format(name.replace('.', '_'))


# the other engineer's static step may keep its earlier test file name
ALSO_ACCEPTED = {'capsnet.training.static_step': 'test_static_step.py'}


@pytest.mark.parametrize('module', sorted(
    name for name in set(library()) | TOOLS | MODEL | set(harnesses())
    if name != 'capsnet' and not library().get(name, '').endswith(
        '__init__.py')))
def test_every_module_and_tool_has_its_test_file(module):
    tests = os.path.join(REPO, 'tests')
    names = {file_of_tests(module), ALSO_ACCEPTED.get(module)}
    assert any(name and os.path.isfile(os.path.join(tests, name))
               for name in names), 'no tests/{} for {}'.format(
                   file_of_tests(module), module)
