"""Varied chat prompts for the head's self-generated training data: templates x fillers, seeded, none equal to a
held-out prompt. engines/orthrus_engines/data/prompts_train_varied.txt is

    python3 scripts/make_varied_prompts.py 1000 16 engines/orthrus_engines/data/prompts_eval.txt

(arguments: how many, the seed, the held-out prompts to leave out). See docs/TRAINING.md.
"""

import random
import sys

rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 16)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
things = [
    "a rainy afternoon",
    "a lost umbrella",
    "the first day of school",
    "a lighthouse keeper",
    "a robot who learns to paint",
    "a busy train station",
    "an old bookshop",
    "a winter market",
    "a dog who hates baths",
    "a mountain village",
    "a birthday surprise",
    "the last day of summer",
    "a friendly dragon",
    "a quiet library",
    "a late-night bakery",
    "a garden in spring",
    "a city at dawn",
    "a broken clock",
    "a message in a bottle",
    "a school science fair",
]
games = [
    "board games",
    "card games",
    "outdoor games",
    "video games for kids",
    "party games",
    "puzzle books",
    "podcasts",
    "novels for teenagers",
    "hobbies for retirees",
    "houseplants for beginners",
    "weekend trips",
    "indoor exercises",
]
audiences = [
    "a family evening",
    "a rainy day",
    "a long car trip",
    "a group of friends",
    "a beginner",
    "a ten-year-old",
    "a busy parent",
    "a college student",
    "someone who lives alone",
    "a small office",
]
feelings = [
    "nervous about my exam tomorrow",
    "overwhelmed by my to-do list",
    "bored with my daily routine",
    "anxious about moving to a new city",
    "stressed about a presentation at work",
    "tired all the time",
    "unsure whether to change careers",
    "lonely since my friend moved away",
    "stuck on my writing project",
    "worried about my first day at a new job",
]
notes = [
    "a thank-you note to a colleague who helped me move",
    "a short apology to a friend for missing their party",
    "a birthday message for my grandmother",
    "a welcome message for a new team member",
    "an email asking my landlord to fix the heating",
    "a note congratulating a friend on graduating",
    "a polite reminder to a client about an unpaid invoice",
    "a farewell message for a retiring teacher",
    "a short invitation to a picnic",
    "a review of a small family restaurant",
]
social = [
    "ask my boss for a day off",
    "tell a friend I cannot lend them money",
    "ask a neighbour to turn the music down",
    "end a long phone call",
    "say no to extra work",
    "give feedback to a coworker",
    "ask for a refund in a shop",
    "apologise for being late",
    "introduce myself at a meeting",
    "split a restaurant bill fairly",
]
py = [
    "reverses the words in a sentence",
    "removes duplicates from a list while keeping order",
    "checks whether a number is prime",
    "returns the second largest number in a list",
    "counts the vowels in a string",
    "flattens a nested list",
    "converts Celsius to Fahrenheit",
    "checks whether a string is a palindrome",
    "merges two dictionaries",
    "finds the most common element in a list",
    "computes the factorial of n iteratively",
    "returns the n-th Fibonacci number",
    "capitalizes the first letter of every word",
    "sums the digits of an integer",
    "groups words by their first letter",
    "checks whether a list is sorted",
    "computes the median of a list",
    "counts the words in a text file",
    "returns all even numbers from a list",
    "rotates a list by k positions",
    "finds the intersection of two lists",
    "validates a simple email address",
    "converts a binary string to an integer",
    "chunks a list into pieces of size n",
    "returns the longest common prefix of a list of strings",
    "computes the greatest common divisor of two numbers",
]
classes = [
    "a to-do list with add and remove methods",
    "a stack with push and pop",
    "a queue using two lists",
    "a rectangle with area and perimeter methods",
    "a simple counter that can be reset",
    "a library book with a borrow method",
    "a temperature sensor that keeps a running average",
    "a shopping cart that totals prices",
    "a student with a list of grades",
]
langs = ["JavaScript", "SQL", "bash", "Python", "TypeScript", "Rust", "Go", "Java", "C"]
tasks = {
    "JavaScript": [
        "returns the largest number in an array",
        "capitalizes every word in a string",
        "debounces a function",
    ],
    "SQL": [
        "counts orders per customer from a table named orders",
        "finds the three most expensive products in a table named products",
        "selects all employees hired after 2020 from a table named employees",
    ],
    "bash": [
        "finds the ten largest files in a folder",
        "renames every .jpeg file to .jpg",
        "prints the disk usage of the home directory",
    ],
    "Python": [
        "reads a CSV file and prints the average of one column",
        "downloads nothing and just lists the files in a folder",
        "sorts a list of tuples by their second element",
    ],
    "TypeScript": [
        "defines an interface for a user with a name and an age",
        "filters an array of numbers to the positive ones",
    ],
    "Rust": ["returns the sum of a vector of integers", "checks whether a string is empty"],
    "Go": ["reverses a slice of integers", "prints the numbers from 1 to 10"],
    "Java": ["checks whether a number is even", "prints the elements of an array"],
    "C": ["swaps two integers using pointers", "computes the length of a string without strlen"],
}
concepts = [
    "a Python dictionary",
    "recursion",
    "a for loop",
    "an HTTP request",
    "a database index",
    "version control",
    "a hash table",
    "object-oriented programming",
    "unit testing",
    "an operating system",
    "a variable",
    "a compiler",
    "the difference between a list and a tuple in Python",
    "what JSON is",
    "a REST API",
    "big-O notation",
    "a pointer in C",
    "what a function is",
    "exceptions in Python",
    "a binary search",
]
science = [
    "how a battery works",
    "why the sky is blue",
    "how bees make honey",
    "what causes thunder",
    "how vaccines work",
    "why we have tides",
    "how plants drink water",
    "how a compass works",
    "why ice floats",
    "what a black hole is",
    "how the moon changes shape",
    "why we need sleep",
    "how a microwave heats food",
    "what causes earthquakes",
    "how soap cleans",
    "why the ocean is salty",
    "how our lungs work",
    "how a bicycle stays upright",
    "what DNA does",
    "how clouds form",
    "why cats purr",
    "how a camera takes a picture",
    "what gravity is",
    "how a volcano erupts",
]
pairs = [
    ("a virus", "a bacterium"),
    ("a lake", "a sea"),
    ("speed", "velocity"),
    ("a meteor", "a comet"),
    ("baking soda", "baking powder"),
    ("a crocodile", "an alligator"),
    ("RAM", "storage"),
    ("a simile", "a metaphor"),
    ("an atom", "a molecule"),
    ("a democracy", "a monarchy"),
    ("renting", "buying a home"),
    ("a frog", "a toad"),
    ("a loan", "a gift"),
]
foods = [
    "healthy lunch ideas for work",
    "quick dinners for a weeknight",
    "snacks for a hiking trip",
    "easy desserts without an oven",
    "vegetarian breakfast ideas",
    "cheap meals for a student",
    "drinks for a summer party",
    "ways to use leftover rice",
]
shapes = ["circle", "square", "rectangle", "triangle"]
names = ["Anna", "Ben", "Carlos", "Dina", "Eli", "Fatima", "George", "Hana", "Ivan", "Julia"]
items = ["apples", "stickers", "books", "marbles", "pencils", "cookies", "cards", "stamps"]


def pick(options: list):
    return rng.choice(options)


def math_prompt() -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 30), rng.randint(2, 12)
    return pick(
        [
            f"What is {a} multiplied by {b}?",
            f"What is {a * b} divided by {b}?",
            f"Solve for y: {c}y + {a} = {c * b + a}.",
            f"What is the perimeter of a rectangle with sides {c} and {b}?",
            f"What is the area of a {pick(['square', 'rectangle'])} with side length {c}?",
            f"{pick(names)} reads {b} pages a day. How many pages does {pick(['she', 'he'])} read in {c} days?",
            f"A recipe needs {c} cups of flour for {b} pancakes. How much flour is needed for {b * 3} pancakes?",
            f"If a jacket costs {a * 2} dollars and is on sale for {pick([10, 20, 25, 50])}% off, "
            "what is the sale price?",
            f"What is {c}/{c * 2} written as a decimal and as a percentage?",
            f"{pick(names)} has {a} {pick(items)} and buys {b} more. "
            f"Then {pick(['she', 'he'])} gives away {c}. How many are left?",
            f"A bus leaves at 9:{rng.randint(10, 59)} and the trip takes {b} minutes. When does it arrive?",
            f"What is the average of {a}, {b} and {c}?",
            f"Round {a}.{rng.randint(10, 99)} to the nearest whole number.",
            f"How many minutes are there in {c} hours?",
            f"What is {a} plus {b} minus {c}?",
            f"Is {a} a prime number? Explain.",
            f"What is {pick([10, 15, 20, 30])}% of {a * 4}?",
        ]
    )

speakers = ["a doctor", "a chef", "a customer", "two friends", "a parent", "a coach"]
listeners = ["a patient", "a waiter", "a shop assistant", "a neighbour", "a child", "a player"]
topics = ["a mistake", "the weather", "a new plan", "a late delivery", "a game", "dinner"]
goals = ["sleeping better", "saving money", "learning to cook", "staying focused", "keeping a plant alive",
         "running a first 5k", "writing a good essay", "making new friends"]
choices = ["working from home", "electric cars", "living in a big city", "online classes", "owning a dog",
           "public transport"]
places = ["the beach", "a museum", "the mountains", "a big city", "a farm", "a national park"]

T = [
    lambda: f"Can you recommend three {pick(games)} for {pick(audiences)} and say why?",
    lambda: f"Write a limerick about {pick(things)}.",
    lambda: f"Write a haiku about {pick(things)}.",
    lambda: f"Write a short story about {pick(things)} in five sentences.",
    lambda: f"I feel {pick(feelings)}. Any advice?",
    lambda: f"Write {pick(notes)}.",
    lambda: f"Describe {pick(things)} in a few sentences.",
    lambda: f"What are some {pick(foods)}?",
    lambda: f"Write a short dialogue between {pick(speakers)} and {pick(listeners)} about {pick(topics)}.",
    lambda: f"How do I politely {pick(social)}?",
    lambda: f"Write a Python function that {pick(py)}.",
    lambda: f"Write a Python function that {pick(py)}. Include a docstring.",
    lambda: f"Write a Python class for {pick(classes)}.",
    lambda: (
        lambda l: (
            f"Write a {l} {'query' if l == 'SQL' else 'command' if l == 'bash' else 'function'} that {pick(tasks[l])}."
        )
    )(pick(langs)),
    lambda: f"Explain {pick(concepts)} to a beginner programmer.",
    lambda: f"Explain {pick(concepts)}, with an example.",
    math_prompt,
    math_prompt,
    math_prompt,
    lambda: f"Explain {pick(science)}.",
    lambda: f"Can you explain {pick(science)} to a child?",
    lambda: (lambda p: f"What is the difference between {p[0]} and {p[1]}?")(pick(pairs)),
    lambda: f"Give me {pick([3, 4, 5])} tips for {pick(goals)}.",
    lambda: f"Summarize the pros and cons of {pick(choices)}.",
    lambda: f"Plan a one-day trip to {pick(places)} for {pick(audiences)}.",
]
held_out = set(open(sys.argv[3]).read().splitlines()) if len(sys.argv) > 3 else set()
prompts: set[str] = set()
while len(prompts) < N:
    prompt = pick(T)()
    if prompt not in held_out:
        prompts.add(prompt)
ordered = sorted(prompts)
rng.shuffle(ordered)
print("\n".join(ordered))
