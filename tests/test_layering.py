"""The import layering the README's file map describes: each module imports
only project modules of its own layer or below, never a tool; no cycles.
Read from the source (every ``import``, also those inside functions)."""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import modules of its layer or below
LAYERS = [
    ('foundations', {'compat', 'cli'}),
    ('data', {'datasets', 'paper_datasets'}),
    ('model and kernels', {'fast_ops', 'baseline', 'nets'}),
    ('files, figures and devices', {'model_io', 'figures', 'devices',
                                    'kernel_profile'}),
    ('training pieces', {'training_extensions', 'distributed',
                         'paper_experiments'}),
    ('tools', {'train', 'visualize', 'evaluate', 'predict', 'experiments',
               'benchmark', 'gpu_check'}),
]
LAYER = {module: rank for rank, (_, modules) in enumerate(LAYERS)
         for module in modules}
TOOLS = LAYERS[-1][1]


def project_modules():
    return sorted(os.path.splitext(os.path.basename(path))[0]
                  for path in glob.glob(os.path.join(REPO, '*.py')))


def imports(module):
    """Project modules that ``module`` imports anywhere in its source."""
    with open(os.path.join(REPO, module + '.py')) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names & set(project_modules())


def test_every_module_has_a_layer():
    assert set(project_modules()) == set(LAYER)


@pytest.mark.parametrize('module', sorted(LAYER))
def test_imports_go_down_and_no_tool_imports_a_tool(module):
    for imported in imports(module):
        assert LAYER[imported] <= LAYER[module], (
            '{} ({}) imports {} ({})'.format(
                module, LAYERS[LAYER[module]][0], imported,
                LAYERS[LAYER[imported]][0]))
        assert imported not in TOOLS, '{} imports the tool {}'.format(
            module, imported)


def test_no_import_cycles():
    graph = {module: imports(module) for module in LAYER}
    done, path = set(), []

    def visit(module):
        assert module not in path, 'cycle: ' + ' -> '.join(path + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checker_sees_imports_inside_functions():
    # the parser, not the layering, is what this checks
    assert 'fast_ops' in imports('benchmark') and 'cli' in imports('datasets')
